"""The driver's own modules travel with the objects handed to Ray, by value.

Ray workers import a pickled class or function by its module's name. Ray puts the driver
script's folder (only when it is on `sys.path`, so not under `python -m`) and the current
folder, both as they are at `ray.init`, on the workers' path; a driver that changed directory,
runs as `python -m`, extended `sys.path` itself, or joins a cluster whose nodes lack its files
leaves the workers with `ModuleNotFoundError`.

So, before the package hands user objects to Ray, every loaded module that is the user's own
(not the standard library, not an installed distribution, not bootfinetune) is registered with
cloudpickle to be pickled by value: its classes and functions travel inside the pickle. A package
is registered whole, so its submodules travel too. A notebook's (`__main__`) objects already do.

What this cannot carry: an `import` statement run inside a function on the worker (move it to
the module's top level, or ship the module with `runtime_env={"py_modules": [...]}`), and
third-party packages not installed on the cluster (`runtime_env={"pip": [...]}`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import site
import sys
import sysconfig
from types import ModuleType

logger = logging.getLogger(__name__)

OWN_PACKAGES = frozenset({"bootfinetune"})
"""Top-level packages never pickled by value: they are installed wherever the package runs."""

_registered: set[str] = set()


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    """Folders whose modules are installed ones: the standard library and every site-packages."""
    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    paths.add(site.getusersitepackages() if hasattr(site, "getusersitepackages") else None)
    return tuple(os.path.realpath(p) + os.sep for p in paths if p)


@functools.lru_cache(maxsize=1)
def _distributed_names() -> frozenset[str]:
    """Top-level import names that belong to an installed distribution (editable installs included)."""
    return frozenset(importlib.metadata.packages_distributions())


def _module_files(module: ModuleType) -> list[str]:
    file = getattr(module, "__file__", None)
    if file:
        return [file]
    return list(getattr(module, "__path__", None) or [])  # a namespace package: its folders


def is_user_module(module: ModuleType) -> bool:
    """Whether a loaded top-level module is the user's own code: a file of theirs, not installed.

    >>> import json, bootfinetune
    >>> is_user_module(json), is_user_module(bootfinetune)
    (False, False)
    """
    name = module.__name__
    if name == "__main__" or "." in name or name in OWN_PACKAGES or name in sys.builtin_module_names:
        return False
    files = _module_files(module)
    if not files:  # built-in or frozen
        return False
    roots = _installed_roots()
    if any(os.path.realpath(f).startswith(roots) for f in files):
        return False
    return name not in _distributed_names()


def user_modules() -> list[ModuleType]:
    """The loaded top-level modules and packages that are the user's own code."""
    tops = {name.partition(".")[0] for name in list(sys.modules)}
    found = []
    for name in sorted(tops):
        module = sys.modules.get(name)
        if isinstance(module, ModuleType) and is_user_module(module):
            found.append(module)
    return found


def ship_user_modules() -> list[str]:
    """Registers the user's own loaded modules to be pickled by value by Ray (and by cloudpickle).

    Call it just before handing user objects (programs, metrics, retrievers, callbacks, teachers)
    to Ray, so that modules imported since the last call are covered too.

    Returns:
        The names of the top-level modules newly registered.
    """
    import cloudpickle
    import ray.cloudpickle

    new = []
    for module in user_modules():
        if module.__name__ in _registered:
            continue
        # Ray pickles actor arguments with its vendored copy; checks.py probes with the standalone one.
        ray.cloudpickle.register_pickle_by_value(module)
        if cloudpickle is not ray.cloudpickle:
            cloudpickle.register_pickle_by_value(module)
        _registered.add(module.__name__)
        new.append(module.__name__)
    if new:
        logger.info("user modules sent to Ray workers by value (not installed there): %s", ", ".join(new))
    return new
