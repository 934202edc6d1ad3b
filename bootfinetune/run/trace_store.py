"""The trace store: one trace identity's folder under the storage path, kept across runs.

```
{storage_path}/traces/{Program}-{trace_id}/
  identity.json    the trace id and a fingerprint of each part of the identity (`stages.traces`;
                   never the parts: they may hold keys)
  results/{host}-{pid}-{random}.jsonl
                   a writer's files (a bootstrap that sent examples to the teacher; on a cloud URI a new
                   one after each upload, see `TraceStore.appender`), one line per (example, teacher),
                   appended as results arrive:
                   {"example": <hash of the example's JSON>, "teacher": 0, "result": {...}}
  results.jsonl    the single file of older versions: read, never written
```

Every run whose traces have the same identity shares the folder, train and val splits alike;
an example already there is not sent to the teacher again. Failures are written (for the
record) but never reused, so a rerun tries them again. On a cloud `storage_path` the folder is a
`Mirror`, like a run directory.

Two runs may write one store at once (their run directories differ, so their writer locks do not
exclude each other): each writes only its own file, created new, so no line is ever interleaved with
another writer's or glued to a line a crash cut short, and on a cloud URI no machine's upload replaces
another's results (each process uploads only its own files). Two writers that run the same example at
once both ask the teacher; either answer serves later runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootfinetune.run.jsonio import fingerprint, write_json
from bootfinetune.run.mirror import Mirror
from bootfinetune.run.rundir import run_name_for
from bootfinetune.run.storage import StorageError

log = logging.getLogger(__name__)

TRACES_DIR = "traces"
"""The folder under storage_path holding every trace store (a run may not be named so)."""
RESULTS = "results.jsonl"
"""The one results file of older versions (read only)."""
RESULTS_DIR = "results"
"""One `{host}-{pid}-{random}.jsonl` per writer."""
IDENTITY = "identity.json"


@dataclass(frozen=True)
class TraceStore(Mirror):
    """One trace identity's folder (a `Mirror`): results appended per (example, teacher), read back by key."""

    @classmethod
    def at(cls, storage_path: str, program_name: str, identity: dict[str, Any]) -> "TraceStore":
        """The store for `identity` under `storage_path`; its identity.json is written when missing."""
        store = cls.under(storage_path, TRACES_DIR, run_name_for(program_name, identity))
        store.pull()
        if not (store.root / IDENTITY).exists():  # fingerprints only: an LM's options may hold credentials
            write_json(store.root / IDENTITY, {"trace_id": trace_id(identity),
                                               "parts": {part: fingerprint(v) for part, v in identity.items()}})
        return store

    @property
    def results(self) -> Path:
        """The single results file of older versions: read, never written."""
        return self.root / RESULTS

    def result_files(self) -> list[Path]:
        """Every results file: the older single one, then each writer's."""
        return [p for p in [self.results, *sorted((self.root / RESULTS_DIR).glob("*.jsonl"))] if p.is_file()]

    def push_own_results(self) -> int:
        """Uploads this process's results files (and identity.json) to the URI; 0 for a folder.

        Only this process's own files: another process sharing the mirror uploads its own, so a
        half-written file of another writer never goes up over its finished upload.
        """
        mine = [f"{RESULTS_DIR}/{p.name}" for p in (self.root / RESULTS_DIR).glob(f"{_process()}-*.jsonl")]
        return self.push(only=[IDENTITY, *mine])

    def load(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Every successful result, by (example key, teacher index); a line cut short by a crash is skipped."""
        done: dict[tuple[str, int], dict[str, Any]] = {}
        for path in self.result_files():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # the last line of a writer that died mid-write
                        continue
                    if "failure" not in row["result"]:
                        done[(row["example"], int(row["teacher"]))] = row["result"]
        return done

    def appender(self, upload_every: int | None = None, upload_s: float | None = None) -> "_Appender":
        """A context manager whose `add(example_key, teacher, result)` appends and flushes one line.

        Each appender writes files of its own, new, under results/ (see the module docstring). On a cloud
        storage_path the results go up as they grow: once `upload_every` results arrived since the last
        upload, or `upload_s` seconds passed, the file is closed and uploaded (`push_own_results`), and the next results
        go to a new file; so a driver that dies (its disk with it) loses only what came after.
        """
        return _Appender(self, upload_every, upload_s)


def _process() -> str:
    """This process's prefix in results/ file names: `{host}-{pid}` (asked each time: a fork has another pid)."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', socket.gethostname())}-{os.getpid()}"


class _Appender:
    def __init__(self, store: TraceStore, upload_every: int | None, upload_s: float | None):
        self.store, self.upload_every, self.upload_s = store, upload_every, upload_s
        self.path = self._new_path()
        """The file the next result goes to (the last one written, once the appender is closed)."""
        self.file: Any = None
        self.uploads = 0
        """Uploads made while appending (cloud storage_path only)."""
        self._since, self._last = 0, time.monotonic()

    def _new_path(self) -> Path:
        return self.store.root / RESULTS_DIR / f"{_process()}-{uuid.uuid4().hex[:8]}.jsonl"

    def __enter__(self) -> "_Appender":
        self._open()
        return self

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "x", encoding="utf-8")  # "x": never another writer's file

    def add(self, example: str, teacher: int, result: dict[str, Any]) -> None:
        if self.file is None:
            self._open()
        self.file.write(json.dumps({"example": example, "teacher": teacher, "result": result},
                                   ensure_ascii=False) + "\n")
        self.file.flush()
        self._since += 1
        if self.store.remote is not None and (
                (self.upload_every is not None and self._since >= self.upload_every)
                or (self.upload_s is not None and time.monotonic() - self._last >= self.upload_s)):
            self.upload()

    def upload(self) -> None:
        """Closes the current file and uploads this process's results; the next result starts a new file.

        A bucket that still fails after the storage's retries is logged, not raised: the results stay in the
        local mirror, and the next upload (or the bootstrap's last) sends them.
        """
        self.file.close()
        self.file, self.path = None, self._new_path()
        self._last = time.monotonic()
        try:
            self.store.push_own_results()
        except StorageError as e:
            log.warning("trace store: uploading %d new result(s) failed (%s); they are kept in %s and go up with "
                        "the next upload", self._since, e, self.store.root)
            return
        self._since = 0
        self.uploads += 1

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()


def trace_id(identity: dict[str, Any]) -> str:
    """12 hex digits naming a trace identity (`stages.traces.trace_identity`)."""
    return fingerprint(identity)


