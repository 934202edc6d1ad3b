"""The check every write and delete of a run goes through: the path must stay in the run once `..` and
symbolic links are resolved (`inside` for a folder, `inside_uri` for object storage), and a folder name read
from a run file must be a safe one (`checked_folder`).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from urllib.parse import urlsplit

from bootfinetune.common.names import is_safe_name
from bootfinetune.errors import ConfigError


class RunPathError(ConfigError):
    """A path bootfinetune was about to write or delete lies outside the run directory."""


def checked_folder(name: str, folder: object, source: object) -> str:
    """A folder name read from a run file, refused (`RunPathError`) unless it is a safe name."""
    if not isinstance(folder, str) or not is_safe_name(folder):
        raise RunPathError(f"{source}: the folder {folder!r} recorded for {name!r} is not a safe folder name; "
                           f"the file was changed by hand or is damaged: compile again into a new run directory.")
    return folder


def inside(root: Path, *parts: str | os.PathLike) -> Path:
    """`root / parts`, after checking it stays inside `root` with `..` and symbolic links resolved.

    Raises:
        RunPathError: the path leaves `root` (a name with `..`, an absolute part, a link pointing out).

    >>> inside(Path("/runs/R"), "models", "all").as_posix()
    '/runs/R/models/all'
    """
    path = Path(root).joinpath(*parts)
    base = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
        raise RunPathError(f"{path}: resolves to {real}, outside the run directory {base}; bootfinetune writes "
                           f"and deletes only inside the run (a name with '..', or a symbolic link pointing out).")
    return path


def inside_uri(base: str, *parts: str) -> str:
    """The normalised path `base/parts` of an object-storage URI, checked to stay under `base`'s path.

    Object stores have no links; the check is on the path string once `.` and `..` are folded.

    >>> inside_uri("s3://b/runs/R?region=x", "models", "all")
    'b/runs/R/models/all'
    """
    s = urlsplit(base)
    root = posixpath.normpath("/" + s.netloc + "/" + s.path.strip("/"))
    path = posixpath.normpath("/".join([root, *(str(p) for p in parts)]))
    if path != root and not path.startswith(root.rstrip("/") + "/"):
        raise RunPathError(f"{'/'.join(parts)}: leaves the run's storage path {root.lstrip('/')}; bootfinetune writes "
                           f"and deletes only inside the run.")
    return path.lstrip("/")


__all__ = ["RunPathError", "checked_folder", "inside", "inside_uri"]
