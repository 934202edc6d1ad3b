"""Import paths `package.module:attr.sub`: how config.json, the job YAMLs and the CLI name user objects.

A leaf: it imports nothing of ours.
"""

from __future__ import annotations

import importlib
from typing import Any


def class_path(obj: Any) -> str:
    """`module:QualName` of an object's class, as `resolve` reads it back.

    >>> class_path(ValueError("x"))
    'builtins:ValueError'
    """
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve(path: str) -> Any:
    """The object an import path `package.module:attr.sub` names (as `class_path` writes them).

    >>> resolve("os.path:join.__name__")
    'join'
    """
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
