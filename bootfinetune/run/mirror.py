"""A folder of the storage path, local or mirrored: what a run directory and a trace store both are.

On a local `storage_path` the folder is the place itself and `pull`/`push` do nothing. On a cloud
URI (`s3://`, `gs://`) `root` is a local mirror of the URI (`storage.mirror_of`): `pull` fetches the
URI's files into it, `push` uploads what changed (`bootfinetune.run.storage`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TypeVar

from bootfinetune.common.redaction import redact_uri
from bootfinetune.run import storage

M = TypeVar("M", bound="Mirror")


@dataclass(frozen=True)
class Mirror:
    """A folder under the storage path: `root` on this machine, `remote` its URI when it has one."""

    root: Path
    """The local folder (a mirror of `remote` on a cloud storage_path)."""
    remote: str | None = None
    """The folder's URI when the storage path is one, else None."""

    @classmethod
    def under(cls: type[M], storage_path: str, *parts: str) -> M:
        """The folder `parts` under `storage_path`: that folder itself, or the URI and its local mirror.

        >>> Mirror.under("/tmp/runs", "R-1")
        Mirror(root=PosixPath('/tmp/runs/R-1'), remote=None)
        """
        if storage.is_uri(storage_path):
            remote = storage.join_uri(storage_path, *parts)
            return cls(storage.mirror_of(remote), remote)
        return cls(Path(storage_path).expanduser().resolve().joinpath(*parts))

    @classmethod
    def from_location(cls: type[M], location: str | os.PathLike) -> M:
        """The folder named whole by its path or its URI (`s3://bucket/runs/Name-1a2b3c`)."""
        text = str(location)
        if storage.is_uri(text):
            return cls(storage.mirror_of(text), text)
        return cls(Path(text).expanduser().resolve())

    @property
    def location(self) -> str:
        """Where it lives for users (logs, messages, config.json): its URI without credentials, or its folder."""
        return redact_uri(self.remote) if self.remote else str(self.root)

    def pull(self) -> int:
        """Fetches the URI's files into the mirror; 0 for a folder."""
        if self.remote is None:
            return 0
        return storage.pull(self.remote, self.root)

    def push(self, only: Iterable[str] | None = None) -> int:
        """Uploads what changed in the mirror (or only the files `only` names) to the URI; 0 for a folder."""
        if self.remote is None:
            return 0
        return storage.push(self.root, self.remote, only=only)
