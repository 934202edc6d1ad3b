"""Run directories on a cloud URI (`s3://`, `gs://`) as well as in a local or shared folder.

Every stage reads and writes an ordinary local folder. When `storage_path` is a URI, that
folder is a mirror of `{uri}/{run_name}` kept under the staging folder
(`$BOOTFINETUNE_STAGING`, default `~/.cache/bootfinetune/staging`):

- `pull` fetches what the URI holds before a run starts, so a run resumes on any machine
  and `bootfinetune.load("s3://.../run")` works where the run never ran;
- `push` uploads what changed after each stage; the files that mark a stage finished
  (`manifest.json`, `summary.json`, `program.json`, `report.json`) go up after the rest,
  so a reader never sees a marker without the files it vouches for;
- Ray Train writes its checkpoints straight to `{uri}/{run_name}/checkpoints`
  (`RunConfig(storage_filesystem=...)`), so training workers on any node save and
  restore them, and they are never copied into the mirror.

URIs go through `pyarrow.fs.FileSystem.from_uri`, so their options are pyarrow's, e.g.
`s3://bucket/runs?endpoint_override=http://127.0.0.1:9000` for an S3-compatible server
(or set `AWS_ENDPOINT_URL`). Credentials come from the usual provider chain (environment,
instance profile, workload identity), never from a file bootfinetune writes.

Every operation on the URI (a listing, each file's download or upload, the index) is retried with
backoff (`RETRY_DELAYS_S`, on top of the S3 client's own retries of each request), so a bucket that
fails for a minute costs a wait, not the run; one that still fails raises `StorageError` naming the
URI without its credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

from bootfinetune.run.jsonio import read_json, write_json
from bootfinetune.run.paths import inside
from bootfinetune.common.redaction import redact_uri, redact_urls_in

log = logging.getLogger(__name__)

STAGING_ENV = "BOOTFINETUNE_STAGING"
MARKERS = ("manifest.json", "summary.json", "program.json", "report.json")
"""Files whose presence says a stage finished: uploaded after every other file."""
INDEX = ".bootfinetune_index.json"
"""On the URI: sha256 of every file `push` uploaded (written after them), so `pull` fetches only changes."""
SYNC_STATE = ".bootfinetune_sync.json"
"""In the mirror, per file at its last pull or push: the local size and mtime, and the URI's version
(its sha256 from the index, else its size and mtime there). Never uploaded."""
_SYNC_LOCK = threading.Lock()  # finetune jobs run in threads and sync the same mirror
REMOTE_ONLY = "checkpoints"
"""Ray Train's checkpoints live only on the URI; the mirror keeps just the job stamps beside them."""
WRITER_FILES = ("writer.lock", "writer.lease")
"""A run's writer lock (flock'ed in each machine's mirror) and its lease (on the URI): never synced
(`bootfinetune.run.writer`)."""


RETRY_DELAYS_S = (1.0, 3.0, 9.0)
"""Seconds between the attempts of one operation on a storage URI (four attempts in all, about 13 s of waiting)."""


class StorageError(OSError):
    """An operation on a storage URI that still failed after its retries; the message names the URI
    without credentials."""


def retrying(action: str, uri: str, fn: Any, *args: Any) -> Any:
    """`fn(*args)`, tried again after each `RETRY_DELAYS_S` while it raises `OSError` (not a missing file).

    Raises:
        StorageError: every attempt failed: `action` and the URI (redacted), the last error, and the fix.
    """
    for attempt, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except OSError as e:
            error = f"{type(e).__name__}: {redact_urls_in(str(e))[:300]}"
            if delay is None:
                raise StorageError(f"storage: {action} {redact_uri(uri)} gave up after {attempt} attempts ({error}); "
                                   f"check the bucket, the endpoint and the credentials, then run again (what "
                                   f"was finished is kept).") from None
            log.warning("storage: %s %s failed (%s); attempt %d of %d in %gs", action, redact_uri(uri), error,
                        attempt + 1, len(RETRY_DELAYS_S) + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` other than `file://` (a plain folder is not a URI).

    >>> is_uri("s3://b/runs"), is_uri("/mnt/shared/runs"), is_uri("file:///tmp/x")
    (True, False, False)
    """
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join_uri(uri: str, *parts: str) -> str:
    """`uri` with path parts appended, its query (pyarrow options) kept at the end.

    >>> join_uri("s3://b/runs?endpoint_override=127.0.0.1:9000", "R-1", "models")
    's3://b/runs/R-1/models?endpoint_override=127.0.0.1:9000'
    """
    s = urlsplit(uri)
    path = "/".join([s.path.rstrip("/")] + [p.strip("/") for p in parts if p])
    return urlunsplit((s.scheme, s.netloc, path, s.query, s.fragment))


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def staging_root() -> Path:
    base = os.environ.get(STAGING_ENV)
    if base:
        return Path(base).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache).resolve() / "bootfinetune" / "staging"


def mirror_of(uri: str) -> Path:
    """The local folder mirroring `uri`: `{staging}/{hash of the parent URI}/{last part}`.

    The same URI gives the same folder on every node that shares a home layout, and the
    folder keeps the URI's last name (a run directory's mirror is named like the run).
    """
    s = urlsplit(uri)
    parent, _, tail = s.path.rstrip("/").rpartition("/")
    digest = hashlib.sha256(urlunsplit((s.scheme, s.netloc, parent, s.query, "")).encode()).hexdigest()[:12]
    return staging_root() / digest / (tail or "root")


def _remote_files(fs: Any, base: str) -> dict[str, Any]:
    import pyarrow.fs as pafs

    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return {}
    if info.type == pafs.FileType.File:
        return {"": info}
    out = {}
    for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if f.type == pafs.FileType.File:
            out[f.path[len(base):].lstrip("/")] = f
    return out


def _mirrored(rel: str) -> bool:
    """Whether a run-relative path belongs in the mirror (checkpoints stay remote, stamps excepted)."""
    parts = rel.split("/")
    if len(parts) == 1 and parts[0] in WRITER_FILES:
        return False
    if parts[0] == REMOTE_ONLY:
        return len(parts) == 3 and parts[2] == "bootfinetune_job.json"
    return parts[-1] != SYNC_STATE and not any(part.endswith(".tmp") for part in parts)  # staged files, folders


def _read_state(local: Path) -> dict[str, dict]:
    try:
        return read_json(local / SYNC_STATE)
    except (OSError, ValueError):
        return {}


def _local_stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_index(fs: Any, base: str, uri: str) -> dict[str, str]:
    def read() -> bytes:
        with fs.open_input_stream(f"{base}/{INDEX}") as f:
            return f.read()

    try:
        return json.loads(retrying("reading the index of", uri, read).decode())
    except (FileNotFoundError, ValueError):  # none yet, or damaged: files are compared by size and time
        return {}


def _download(fs: Any, source: str, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.pull.tmp")
    with fs.open_input_stream(source) as src, open(tmp, "wb") as out:
        _copy(src, out)
    os.replace(tmp, dest)


def _upload(fs: Any, path: Path, target: str) -> str:
    with open(path, "rb") as src, fs.open_output_stream(target) as out:
        return _copy(src, out)


def _copy(src: Any, out: Any) -> str:
    """Copies a stream in 8 MiB chunks; returns the sha256 of what went through."""
    digest = hashlib.sha256()
    while chunk := src.read(8 << 20):
        digest.update(chunk)
        out.write(chunk)
    return digest.hexdigest()


def pull(uri: str, local: Path) -> int:
    """Downloads the files under `uri` that are new or changed there since the mirror last synced.

    What changed is told by the URI's index (sha256 per file, written by `push`); a file the
    index does not list is compared by size and modification time. Returns how many files
    were downloaded.
    """
    with _SYNC_LOCK:
        return _pull(uri, local)


def _pull(uri: str, local: Path) -> int:
    fs, base = filesystem(uri)
    local.mkdir(parents=True, exist_ok=True)
    state, index = _read_state(local), _read_index(fs, base, uri)
    fetched = 0
    for rel, info in retrying("listing", uri, _remote_files, fs, base).items():
        if not rel or rel == INDEX or not _mirrored(rel):
            continue
        dest, seen = inside(local, rel), state.get(rel) or {}  # an object named `../x` is refused
        version = index.get(rel) or [info.size, info.mtime_ns]
        if dest.exists() and seen.get("remote") == version:
            continue  # the URI holds the version we last synced
        dest.parent.mkdir(parents=True, exist_ok=True)
        retrying(f"downloading {rel} from", uri, _download, fs, f"{base}/{rel}", dest)
        state[rel] = {"local": _local_stamp(dest), "remote": version}
        fetched += 1
    write_json(local / SYNC_STATE, state)
    if fetched:
        log.info("storage: %d file(s) from %s into %s", fetched, redact_uri(uri), local)
    return fetched


def push(local: Path, uri: str, only: Iterable[str] | None = None) -> int:
    """Uploads the mirror's files that changed since the last pull or push; markers last, then the index.

    `only` (paths relative to `local`) limits the upload to those files: a writer that shares the
    mirror folder with others (the trace store) uploads just its own, never another's half-written one.
    Returns how many files were uploaded.
    """
    with _SYNC_LOCK:
        return _push(local, uri, None if only is None else set(only))


def _push(local: Path, uri: str, only: set[str] | None = None) -> int:
    fs, base = filesystem(uri)
    state = _read_state(local)
    changed = []
    files = (local / rel for rel in sorted(only)) if only is not None else local.rglob("*")
    for path in sorted(p for p in files if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if _mirrored(rel) and (state.get(rel) or {}).get("local") != _local_stamp(path):
            changed.append((rel, path))
    if not changed:
        return 0
    changed.sort(key=lambda item: (item[0].rsplit("/", 1)[-1] in MARKERS, item[0]))
    index = _read_index(fs, base, uri)
    made: set[str] = set()
    try:
        for rel, path in changed:
            target = f"{base}/{rel}"
            parent = target.rsplit("/", 1)[0]
            if parent not in made:
                retrying("creating a folder on", uri, lambda: fs.create_dir(parent, recursive=True))
                made.add(parent)
            stamp = _local_stamp(path)
            index[rel] = retrying(f"uploading {rel} to", uri, _upload, fs, path, target)
            state[rel] = {"local": stamp, "remote": index[rel]}
        retrying("writing the index of", uri, _write_index, fs, base, index)
    finally:  # what went up is not sent again by the next push
        write_json(local / SYNC_STATE, state)
    log.info("storage: %d file(s) from %s to %s", len(changed), local, redact_uri(uri))
    return len(changed)


def _write_index(fs: Any, base: str, index: dict[str, str]) -> None:
    with fs.open_output_stream(f"{base}/{INDEX}") as out:
        out.write(json.dumps(index, sort_keys=True).encode())


def remove(uri: str) -> None:
    """Deletes everything under `uri` (a folder), if anything is there."""
    import pyarrow.fs as pafs

    fs, base = filesystem(uri)
    if retrying("looking up", uri, fs.get_file_info, base).type != pafs.FileType.NotFound:
        retrying("deleting", uri, lambda: fs.delete_dir_contents(base, missing_dir_ok=True))


def check_writable(uri: str) -> str | None:
    """None when `uri` can be written; else a one-line problem naming storage_path and the fix."""
    try:
        fs, base = filesystem(uri)
        probe = f"{base}/.bootfinetune_probe"
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # pyarrow raises OSError/ArrowInvalid variants
        return (f"storage_path={redact_uri(uri)!r}: cannot write there ({type(e).__name__}: {redact_urls_in(str(e))[:200]}); check the "
                f"bucket name, the endpoint (?endpoint_override=... or AWS_ENDPOINT_URL) and the credentials.")
    return None
