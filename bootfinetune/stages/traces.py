"""Teacher traces: what identifies them, and the store that keeps them across runs.

Traces are the expensive part of a compile (a hosted teacher costs money and hours), so
they are keyed by what produces them, not by how the student is trained:

- the structure of the teacher programs (predictors, signatures, demos, LMs) and the student's
  predictors and signatures (its LMs and demos only shape the training data),
- `teacher_settings`, with LMs by model and options and other objects by class and settings,
- the driver's `dspy.configure` settings the teacher runs under (lm, rm, the other carried settings,
  and the compile's adapter: the teacher writes its prompts with it),
- the metric and its threshold.

Training options, the target, LoRA, ZeRO and resources are left out: changing them reuses every trace.

```
{storage_path}/traces/{Program}-{trace_id}/
  identity.json    the trace id and a fingerprint of each part above (never the parts: they may hold keys)
  results/{host}-{pid}-{random}.jsonl
                   a writer's files (a bootstrap that sent examples to the teacher; on a cloud URI a new
                   one after each upload, see `TraceStore.appender`), one line per (example, teacher),
                   appended as results arrive:
                   {"example": <hash of the example's JSON>, "teacher": 0, "result": {...}}
  results.jsonl    the single file of older versions: read, never written
```

Every run whose traces have the same identity shares the folder, train and val splits alike;
an example already there is not sent to the teacher again. Failures are written (for the
record) but never reused, so a rerun tries them again. On a cloud `storage_path` the folder is mirrored like a run directory.

Two runs may write one store at once (their run directories differ, so their writer locks do not
exclude each other): each writes only its own file, created new, so no line is ever interleaved with
another writer's or glued to a line a crash cut short, and on a cloud URI no machine's upload replaces
another's results (each process uploads only its own files). Two writers that run the same example at
once both ask the teacher; either answer serves later runs.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import dspy

from bootfinetune.common.redaction import redact_uri
from bootfinetune.stages.checks import callable_identity, lm_identity, program_identity
from bootfinetune.run.jsonio import fingerprint, write_json
from bootfinetune.run.records import example_to_json
from bootfinetune.run.rundir import run_name_for
from bootfinetune.run.storage import StorageError, place, pull, push

log = logging.getLogger(__name__)

TRACES_DIR = "traces"
"""The folder under storage_path holding every trace store (a run may not be named so)."""
RESULTS = "results.jsonl"
"""The one results file of older versions (read only)."""
RESULTS_DIR = "results"
"""One `{host}-{pid}-{random}.jsonl` per writer."""
IDENTITY = "identity.json"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Settings that observe the teacher's calls, or set how DSPy runs them (threads, history, error
# limits), without changing what the teacher answers: left out of the identity, so adding a logging
# callback or more threads does not re-run the teacher.
_OBSERVERS = {"callbacks", "track_usage", "usage_tracker", "trace", "num_threads", "async_max_workers",
              "max_errors", "disable_history", "max_history_size", "max_trace_size", "provide_traceback",
              "warn_on_type_mismatch"}


def stable_identity(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a value that is the same in every process (never a memory address).

    LMs are described by `lm_identity`, programs by `program_identity`, functions and classes
    by name and source hash, other objects by their class and their public attributes.

    >>> stable_identity({"temperature": 0.7, "stop": ("\\n",)})
    {'temperature': 0.7, 'stop': ['\\n']}
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return _ADDRESS.sub("", value)
    if isinstance(value, dspy.BaseLM):
        return lm_identity(value)
    if isinstance(value, dspy.Module):
        return program_identity(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [stable_identity(v, depth + 1) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, dict):
        return {str(k): stable_identity(v, depth + 1) for k, v in value.items()}
    if isinstance(value, functools.partial):  # a metric with its threshold bound in: every part counts
        return {"partial": stable_identity(value.func, depth + 1), "args": stable_identity(value.args, depth + 1),
                "keywords": stable_identity(value.keywords, depth + 1)}
    if inspect.isroutine(value) or inspect.isclass(value):
        return callable_identity(value)
    described: dict[str, Any] = {"class": callable_identity(type(value))}
    if depth < 4 and hasattr(value, "__dict__"):
        described["attrs"] = {k: stable_identity(v, depth + 1) for k, v in sorted(vars(value).items())
                              if not k.startswith("_") and k not in _OBSERVERS}
    return described


def trace_identity(*, student: dspy.Module, teachers: list[dspy.Module], teacher_settings: dict[str, Any],
                   settings: dict[str, Any], metric: Callable | None, metric_threshold: float | None) -> dict[str, Any]:
    """What produces a compile's teacher traces, part by part (see the module docstring).

    Args:
        student: The student; its predictor names decide which trace steps are recorded.
        teachers: The teacher programs.
        teacher_settings: Applied while the teachers run.
        settings: The driver's `dspy.configure` settings that reach the actors (lm, rm, adapter).
        metric: The metric, or None.
        metric_threshold: The threshold that keeps float scores.

    Returns:
        {part: description}; `trace_id` hashes it.
    """
    # The student's LMs and demos shape training data, not traces (its LM is where a 3.x-style program
    # names its target); what the traces need from it is which predictors exist and their signatures.
    shape = program_identity(student)
    shape["predictors"] = [{k: v for k, v in p.items() if k not in ("lm", "demos")} for p in shape["predictors"]]
    return {
        "student": shape,
        "teachers": [program_identity(t) for t in teachers],
        "teacher_settings": {k: stable_identity(v) for k, v in sorted(teacher_settings.items())
                             if k not in _OBSERVERS},
        "settings": {k: stable_identity(v) for k, v in sorted(settings.items()) if k not in _OBSERVERS},
        "metric": stable_identity(metric),
        "metric_threshold": metric_threshold,
    }


def trace_id(identity: dict[str, Any]) -> str:
    """12 hex digits naming a trace identity."""
    return fingerprint(identity)


def example_key(example: dspy.Example) -> str:
    """What identifies one example in a store: a hash of its JSON (fields and which are inputs)."""
    return hashlib.sha256(example_to_json(example).encode()).hexdigest()[:16]


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the trace identity's parts that differ, from their per-part fingerprints.

    >>> identity_changes({"metric": "a", "teachers": "b"}, {"metric": "c", "teachers": "b"})
    ['metric']
    """
    return [part for part in sorted(set(old) | set(new)) if old.get(part) != new.get(part)]


def example_changes(old: list[str], new: list[str]) -> str | None:
    """"4 new, 1 removed examples" between two lists of example keys, or None when the same."""
    if old == new:
        return None
    added, removed = len(set(new) - set(old)), len(set(old) - set(new))
    if not added and not removed:
        return "the same examples in another order"
    return f"{added} new, {removed} removed example(s)"


@dataclass(frozen=True)
class TraceStore:
    """One trace identity's folder: results appended per (example, teacher), read back by key."""

    root: Path
    """The local folder (a mirror of `remote` on a cloud storage_path)."""
    remote: str | None = None
    """The folder's URI when storage_path is one, else None."""

    @classmethod
    def at(cls, storage_path: str, program_name: str, identity: dict[str, Any]) -> "TraceStore":
        """The store for `identity` under `storage_path`; its identity.json is written when missing."""
        store = cls(*place(storage_path, TRACES_DIR, run_name_for(program_name, identity)))
        store.pull()
        if not (store.root / IDENTITY).exists():  # fingerprints only: an LM's options may hold credentials
            write_json(store.root / IDENTITY, {"trace_id": trace_id(identity),
                                               "parts": {part: fingerprint(v) for part, v in identity.items()}})
        return store

    @property
    def location(self) -> str:
        """Where the store lives for users (logs, messages, config.json): its URI without credentials, or its folder."""
        return redact_uri(self.remote) if self.remote else str(self.root)

    @property
    def results(self) -> Path:
        """The single results file of older versions: read, never written."""
        return self.root / RESULTS

    def result_files(self) -> list[Path]:
        """Every results file: the older single one, then each writer's."""
        return [p for p in [self.results, *sorted((self.root / RESULTS_DIR).glob("*.jsonl"))] if p.is_file()]

    def pull(self) -> None:
        """Fetches the URI's results into the mirror; nothing for a folder."""
        if self.remote is not None:
            pull(self.remote, self.root)

    def sync(self) -> None:
        """Uploads this process's results files (and identity.json) to the URI; nothing for a folder.

        Only this process's own files: another process sharing the mirror uploads its own, so a
        half-written file of another writer never goes up over its finished upload.
        """
        if self.remote is not None:
            mine = [f"{RESULTS_DIR}/{p.name}" for p in (self.root / RESULTS_DIR).glob(f"{_process()}-*.jsonl")]
            push(self.root, self.remote, only=[IDENTITY, *mine])

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
        upload, or `upload_s` seconds passed, the file is closed and uploaded (`sync`), and the next results
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
            self.store.sync()
        except StorageError as e:
            log.warning("trace store: uploading %d new result(s) failed (%s); they are kept in %s and go up with "
                        "the next upload", self._since, e, self.store.root)
            return
        self._since = 0
        self.uploads += 1

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()


def restamp(result: dict[str, Any], example_index: int, split: str) -> dict[str, Any]:
    """A stored result as the record of example `example_index` of `split` in this run."""
    out = dict(result)
    if "calls" in out:
        out["calls"] = [{**c, "example_index": example_index, "split": split} for c in out["calls"]]
    if "failure" in out:
        out["failure"] = {**out["failure"], "example_index": example_index, "split": split}
    return out
