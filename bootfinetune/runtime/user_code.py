"""The driver's own modules reach Ray workers as code: their files, imported on each worker.

A Ray worker imports a pickled function or class by its module's name. A module of the user's (the
retriever beside the driver, a package of theirs that is not installed) is often not importable
there: Ray puts only the driver script's folder and the current folder, as they were at `ray.init`,
on the workers' path, and a node of another machine may not have the files at all. Pickling such a
module by value instead would send its module-level state (a lock, a database connection, a client),
which cannot travel or arrives stale. So the package ships the modules' source:

- `keep_sources` (run by `import bootfinetune`) keeps each user module's Python files as they are
  when the module is imported (and those of user modules already imported), so a driver whose
  folder is moved after its imports still ships its code (files still in place are read afresh);
- `ship_user_modules` zips the files of every loaded user module (a package whole) into a `UserCode`,
  which goes to each actor with its other constructor arguments (Ray moves a large one through its
  object store);
- `install`, on a worker before any user object is unpickled, unpacks that zip into a folder named
  by its content (once per node) and puts the folder first on `sys.path`. User objects pickle by
  reference, so their modules are imported there and create their module-level objects there.

Objects defined in `__main__` (a script's or a notebook's) travel by value, as cloudpickle sends
them; what they reference from the user's modules is imported on the worker.

Not shipped: third-party packages (install them on the cluster, or `runtime_env={"pip": [...]}`),
packages of the user's installed with `pip install -e` (installed ones: install them on the cluster
too) and files other than Python sources (data the modules read beside them).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import io
import logging
import os
import shutil
import site
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

from bootfinetune.errors import ProgramError

logger = logging.getLogger(__name__)

OWN_PACKAGES = frozenset({"bootfinetune"})
"""Top-level packages never shipped: they are installed wherever the package runs."""
CODE_DIR = "bootfinetune-code"
"""Under a worker's temp folder: one folder per shipped content (`UserCode.digest`)."""
MAX_SOURCE_BYTES = 64 << 20
"""The most Python source shipped per compile; more is refused with the way to ship it instead."""

_kept: dict[str, dict[str, bytes]] = {}
"""Top-level module name -> its files as `ship_user_modules` zips them, as they were when it was imported."""
_shipped: set[str] = set()
"""Digests already named in the log."""


@dataclass(frozen=True)
class UserCode:
    """The user's modules as a worker gets them: a zip of their files."""

    digest: str
    """sha256 (16 hex digits) of the zip: the worker's folder name, so one content is unpacked once per node."""
    modules: tuple[str, ...]
    """The top-level modules and packages it holds."""
    zipped: bytes = b""
    """The zip (`zip_sources`); empty when the user has no modules of their own."""


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    """Folders whose modules are installed ones: the standard library, every site-packages, shipped code."""
    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    paths.add(site.getusersitepackages() if hasattr(site, "getusersitepackages") else None)
    paths.add(str(Path(tempfile.gettempdir()) / CODE_DIR))  # what `install` unpacked on a worker
    return tuple(os.path.realpath(p) + os.sep for p in paths if p)


@functools.lru_cache(maxsize=1)
def _distributed_names() -> frozenset[str]:
    """Top-level import names that belong to an installed distribution (editable installs included)."""
    return frozenset(importlib.metadata.packages_distributions())


def _module_files(module: ModuleType) -> list[str]:
    """A package's folders (several for a namespace package), else the module's file."""
    folders = getattr(module, "__path__", None)
    if folders is not None:
        return list(folders)
    file = getattr(module, "__file__", None)
    return [file] if file else []


def _outside_installed(name: str, files: list[str]) -> bool:
    """A module of files that are not installed ones (a cheap test: no distribution metadata read)."""
    if name == "__main__" or "." in name or name in OWN_PACKAGES or name in sys.builtin_module_names or not files:
        return False
    roots = _installed_roots()
    return not any(os.path.realpath(f).startswith(roots) for f in files)


def is_user_module(module: ModuleType) -> bool:
    """Whether a loaded top-level module is the user's own code: a file of theirs, not installed.

    >>> import json, bootfinetune
    >>> is_user_module(json), is_user_module(bootfinetune)
    (False, False)
    """
    name = module.__name__
    return _outside_installed(name, _module_files(module)) and name not in _distributed_names()


def user_modules() -> list[ModuleType]:
    """The loaded top-level modules and packages that are the user's own code."""
    tops = {name.partition(".")[0] for name in list(sys.modules)}
    found = []
    for name in sorted(tops):
        module = sys.modules.get(name)
        if isinstance(module, ModuleType) and is_user_module(module):
            found.append(module)
    return found


def read_sources(name: str, files: list[str], limit: int = MAX_SOURCE_BYTES) -> dict[str, bytes] | None:
    """A top-level module's files as archive paths: its file (`name.py`), or every `.py` of a package's
    folders under `name/` (caches and hidden folders left out). None when they cannot be read now, or
    hold more than `limit` bytes.
    """
    out: dict[str, bytes] = {}
    size = 0
    try:
        for file in files:
            path = Path(file)
            if path.is_dir():
                found = [(f"{name}/{p.relative_to(path).as_posix()}", p) for p in sorted(path.rglob("*.py"))]
                found = [(arc, p) for arc, p in found
                         if not any(part.startswith(".") or part == "__pycache__" for part in arc.split("/")[1:])]
            else:
                found = [(path.name, path)]
            for arc, p in found:
                out[arc] = p.read_bytes()
                size += len(out[arc])
                if size > limit:
                    return None
    except OSError:  # moved or deleted since its import: the caller says what to do
        return None
    return out


def _keep(name: str, files: list[str]) -> None:
    if name not in _kept and _outside_installed(name, files):
        sources = read_sources(name, files)
        if sources:
            _kept[name] = sources


class _SourceKeeper:
    """A `sys.meta_path` finder that finds nothing: it keeps a user module's files as the module is imported."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if path is None and "." not in fullname and fullname not in _kept and fullname not in sys.modules:
            try:
                spec = importlib.machinery.PathFinder.find_spec(fullname)
            except (ImportError, OSError, ValueError):  # the import itself reports its own failure next
                spec = None
            if spec is not None:
                locations = spec.submodule_search_locations
                _keep(fullname, list(locations) if locations is not None else
                      ([spec.origin] if spec.has_location and spec.origin else []))
        return None


def keep_sources() -> None:
    """Keeps the files of the user modules loaded now, and of each one imported from now on (once per process)."""
    if not any(isinstance(finder, _SourceKeeper) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceKeeper())
    for name, module in list(sys.modules.items()):
        if "." not in name and isinstance(module, ModuleType):
            _keep(name, _module_files(module))


def collect_sources() -> tuple[dict[str, bytes], list[str], list[str]]:
    """(archive path -> bytes, the modules they hold, problems): every loaded user module's files.

    A module's files as they are now; where they cannot be read any more (moved, deleted), as they were
    when `keep_sources` saw the module imported.
    """
    files: dict[str, bytes] = {}
    names: list[str] = []
    problems: list[str] = []
    for module in user_modules():
        name = module.__name__
        sources = read_sources(name, _module_files(module)) or _kept.get(name)
        if sources is None:
            problems.append(
                f"module {name!r} ({', '.join(_module_files(module))}): its Python files cannot be read now (moved, "
                f"deleted, or more than {MAX_SOURCE_BYTES >> 20} MiB), so Ray workers cannot import it; keep its "
                f"files in place (or import bootfinetune before moving them), or install it on the cluster.")
            continue
        files.update(sources)
        names.append(name)
    total = sum(len(b) for b in files.values())
    if total > MAX_SOURCE_BYTES:
        problems.append(f"modules {names}: {total >> 20} MiB of Python files to send to Ray workers (at most "
                        f"{MAX_SOURCE_BYTES >> 20} MiB); install the large ones on the cluster (pip install) or "
                        f"ship them with the job's runtime_env py_modules.")
    return files, names, problems


def ship_user_modules() -> UserCode:
    """The user's loaded modules zipped, for `install` on each worker.

    Call it just before handing user objects (programs, metrics, retrievers, callbacks, teachers)
    to Ray, so that modules imported since the last call are included.

    Raises:
        ProgramError: a user module whose files cannot be read, or too much source to send.
    """
    files, names, problems = collect_sources()
    if problems:
        raise ProgramError(problems)
    blob = zip_sources(files)
    digest = hashlib.sha256(blob).hexdigest()[:16]
    if names and digest not in _shipped:
        _shipped.add(digest)
        logger.info("user modules sent to Ray workers as code (imported there): %s (%d files, %d KiB)",
                    ", ".join(names), len(files), len(blob) >> 10)
    return UserCode(digest, tuple(names), blob if names else b"")


def zip_sources(files: dict[str, bytes]) -> bytes:
    """The files zipped in a fixed order with fixed dates: the same files give the same bytes (and digest)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for arc in sorted(files):
            z.writestr(zipfile.ZipInfo(arc, date_time=(1980, 1, 1, 0, 0, 0)), files[arc])
    return buffer.getvalue()


def install(code: UserCode | None) -> Path | None:
    """On a worker: the shipped modules unpacked (once per node and content) and first on `sys.path`.

    Call it before unpickling user objects. Returns the folder, or None when nothing was shipped.
    """
    if code is None or not code.zipped:
        return None
    root = Path(tempfile.gettempdir()) / CODE_DIR / code.digest
    if not root.is_dir():
        unpack(code.zipped, root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()
    return root


def unpack(blob: bytes, root: Path) -> None:
    """Unpacks into a folder of its own, then renames it into place: a worker beside us may be doing the same."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for arc in z.namelist():
            parts = PurePosixPath(arc).parts
            if PurePosixPath(arc).is_absolute() or ".." in parts:
                raise ValueError(f"shipped code holds a path outside its folder: {arc!r}")
            target = tmp.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(arc))
    try:
        os.rename(tmp, root)
    except OSError:  # another worker of this node unpacked the same content first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
