"""How user objects are pickled for Ray workers: as cloudpickle pickles them, except the module-level
objects of the user's modules that cannot be pickled, which go by reference.

Functions and classes of a user module pickle by reference: the worker imports the module from its
shipped files (`bootfinetune.runtime.user_code`), so the module-level objects they use (a lock, a
database connection, a client) are created there. An object made at a user module's top level and
handed over itself (`dspy.configure(rm=retriever.RM)`, `RM` holding a client) would pickle by value;
where that fails, it goes as "attribute `RM` of module `retriever`" and the worker's import of the
module makes its own. One that pickles goes by value, as before: a program built at module level and
changed by the driver (`set_lm`, loaded demos) reaches the worker with those changes.
"""

from __future__ import annotations

import importlib
import io
import sys
from types import BuiltinFunctionType, FunctionType, ModuleType
from typing import Any

import cloudpickle

from bootfinetune.runtime.user_code import user_modules

_BY_NAME = (ModuleType, type, FunctionType, BuiltinFunctionType)
"""What cloudpickle already sends by reference (from an importable module)."""
_ATOMIC = (int, float, complex, bool, str, bytes, type(None))
"""Values that always pickle, and whose identity is shared (small ints, interned strings): never indexed."""


def module_attribute(module: str, name: str) -> Any:
    """On the worker: `module.name`, the module imported there (what a by-reference object unpickles to)."""
    return getattr(importlib.import_module(module), name)


def module_objects() -> dict[int, tuple[str, str, Any]]:
    """id -> (module, attribute, object) for the objects at the top level of the user's loaded modules."""
    tops = {m.__name__ for m in user_modules()}
    index: dict[int, tuple[str, str, Any]] = {}
    for name, module in sorted(sys.modules.items()):
        if name.partition(".")[0] not in tops or not isinstance(module, ModuleType):
            continue
        for attr, value in list(vars(module).items()):
            if not attr.startswith("__") and not isinstance(value, _BY_NAME + _ATOMIC):
                index.setdefault(id(value), (name, attr, value))
    return index


def _pickles(obj: Any) -> bool:
    try:
        cloudpickle.dumps(obj)
    except Exception:  # cloudpickle raises many types: all mean "not by value"
        return False
    return True


class ModuleObjectsByReference:
    """A cloudpickle `Pickler` mixin: a user module's top-level object that cannot be pickled goes by reference."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._module_objects = module_objects()
        self._by_reference: dict[int, bool] = {}

    def reducer_override(self, obj: Any) -> Any:
        where = self._module_objects.get(id(obj))
        if where is not None and where[2] is obj:
            if id(obj) not in self._by_reference:
                self._by_reference[id(obj)] = not _pickles(obj)
            if self._by_reference[id(obj)]:
                return module_attribute, where[:2]
        return super().reducer_override(obj)  # type: ignore[misc]


class WorkerPickler(ModuleObjectsByReference, cloudpickle.Pickler):
    """cloudpickle's pickler with `ModuleObjectsByReference`."""


def dumps(obj: Any) -> bytes:
    """`obj` pickled as Ray workers get it (raises what cloudpickle raises for what cannot travel)."""
    buffer = io.BytesIO()
    WorkerPickler(buffer, protocol=5).dump(obj)
    return buffer.getvalue()
