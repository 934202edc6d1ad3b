"""One writer per run directory: a second compile of the same run waits or stops, naming the first.

A compile (and `prepare`, a retrain, the finetune job) holds its run's writer lock from before the
first teacher call until it returns or raises. Another one reaching the same run either stops at once
with `RunBusyError` naming the holder (host, pid, start time, command), the default, or waits up to
`writer_wait_s` seconds for it to finish and then resumes what it finished.

**Locally** (a folder `storage_path`, and the local mirror of a cloud run): `writer.lock` in the run
directory, held with `fcntl.flock` while the compile runs. The kernel drops the lock when the process
ends, however it ends (SIGKILL, OOM, a lost node's process gone), so a crashed writer never blocks the
next one. The file holds the holder's description for the message; it is never deleted (deleting a
lock file another process waits on would let two writers in). On a shared filesystem the lock holds
across machines where the filesystem honours `flock` between clients (NFSv4 through Linux's POSIX-lock
emulation, Lustre, CephFS); some FUSE mounts honour it only within one machine: use a cloud URI there.

**On a cloud `storage_path`** (S3, GCS, through pyarrow) there is no compare-and-swap to build on, so
the rule is a lease, `writer.lease` beside the run's files on the URI (JSON: the holder and `expires`,
a UNIX time):

1. Read the lease. Another writer's lease that has not expired: wait or stop, naming it.
2. Otherwise write ours (with a fresh token), wait `SETTLE_S`, read it back: our token means the run is
   ours; another's means that writer wrote last and holds it (back to 1).
3. A heartbeat thread renews it (a new `expires`) every third of `writer_lease_s`. A crashed writer stops
   renewing, and its lease is taken over once it expires (default 180 s).
4. Release deletes it when it still holds our token.

What this leaves open, said plainly: two writers can both believe they hold the run if one's write
lands more than `SETTLE_S` after its read found the lease free (a PUT stalled for seconds), or if a
writer stalls longer than `writer_lease_s` (a suspended VM) and another takes over; the heartbeat then
finds the foreign token and `check()` stops the stalled one at its next stage boundary. Expiry is judged
on each machine's own clock, so clocks must agree to well within the lease (NTP does). S3 and GCS read
their own writes strongly, which step 2 needs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from bootfinetune.common.redaction import public_command
from bootfinetune.errors import RunBusyError
from bootfinetune.run import storage
from bootfinetune.run.paths import RunPathError
from bootfinetune.run.rundir import RunDir

log = logging.getLogger(__name__)

LOCK_FILE, LEASE_FILE = storage.WRITER_FILES
"""writer.lock: in the run directory (or a cloud run's mirror), flock'ed by the writer, naming it;
writer.lease: on a cloud run's URI, the writer's lease. Neither is synced."""
SETTLE_S = 1.0
"""Seconds between writing a lease and reading it back (a concurrent writer's PUT lands in between)."""
POLL_S = 0.5
"""Seconds between tries while waiting for another writer."""
DEFAULT_LEASE_S = 180.0


@dataclass
class Writer:
    """Who writes a run: what the error message names."""

    host: str
    pid: int
    started: str
    """UTC start time, ISO 8601."""
    command: str
    """The driver's command line as `redaction.public_command` shows it, cut to 300 characters."""
    what: str
    """"compile", "prepare", "retrain"."""
    token: str
    """Unique per acquisition: tells a lease of ours from another's."""
    expires: float | None = None
    """Lease only: UNIX time after which the lease may be taken over."""

    @classmethod
    def this_process(cls, operation: str) -> "Writer":
        command = public_command([sys.argv[0] or sys.executable, *sys.argv[1:]])
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   command=command[:300], what=operation, token=uuid.uuid4().hex)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Writer | None":
        try:
            data = json.loads(text)
            return cls(**{k: data[k] for k in ("host", "pid", "started", "command", "what", "token")},
                       expires=data.get("expires"))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        """'a compile, pid 4242 on node-1, started 2026-12-01T19:58:03+00:00: python train.py'."""
        return f"a {self.what}, pid {self.pid} on {self.host}, started {self.started}: {self.command}"


class _FileLock:
    """`writer.lock` held with flock (exclusive, non-blocking); the holder's description inside."""

    def __init__(self, path: Any):
        self.path = path
        self.fd: int | None = None

    def try_acquire(self, me: Writer) -> Writer | None:
        """None when taken (our description written in); else the holder, as its file names it.

        Raises:
            RunPathError: the lock file is a symbolic or hard link, or not a regular file: planted in a shared
                run folder, it would make this writer overwrite what it points at.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._holder()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.to_json().encode(), 0)
        self.fd = fd
        return None

    def _open(self) -> int:
        refused = (f"{self.path}: the run's writer lock is a link or not a regular file; bootfinetune writes only "
                   f"its own files in a run. Delete {self.path.name} (a compile makes it again) and check who "
                   f"can write the run directory.")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunPathError(refused) from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise RunPathError(refused)
        return fd

    def _holder(self) -> Writer:
        for _ in range(20):  # the holder writes its description right after taking the lock
            try:
                holder = Writer.from_json(self.path.read_bytes())
            except OSError:
                holder = None
            if holder is not None:
                return holder
            time.sleep(0.05)
        return Writer(host="?", pid=0, started="?", command=f"(not named in {self.path})", what="writer", token="")

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # an emptied file: nobody is named once the lock is free
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


class _Lease:
    """`writer.lease` on a cloud run's URI (see the module docstring for the rule)."""

    def __init__(self, remote: str):
        self.uri = storage.join_uri(remote, LEASE_FILE)
        self.fs, self.path = storage.filesystem(self.uri)

    def read(self) -> Writer | None:
        """The lease on the URI (None when there is none), with the storage's bounded retries."""
        try:
            return Writer.from_json(storage.retrying("reading the writer lease", self.uri, self._read))
        except FileNotFoundError:
            return None

    def _read(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write(self, writer: Writer) -> None:
        storage.retrying("writing the writer lease", self.uri, self._write, writer.to_json().encode())

    def _write(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.path) as out:
            out.write(data)

    def try_acquire(self, me: Writer, lease_s: float) -> Writer | None:
        """None when the lease is ours after the read-back; else the writer holding it."""
        current = self.read()
        if current is not None and current.token != me.token and (current.expires or 0) > time.time():
            return current
        if current is not None and current.token != me.token:
            log.warning("run writer: the lease of %s expired at %s; taking it over", current.describe(),
                        _utc(current.expires))
        me.expires = time.time() + lease_s
        self.write(me)
        time.sleep(SETTLE_S)
        back = self.read()
        if back is not None and back.token == me.token:
            return None
        return back or current or me  # gone again (released meanwhile): tried again after POLL_S

    def delete_if_ours(self, me: Writer) -> None:
        current = self.read()
        if current is not None and current.token == me.token:
            storage.retrying("deleting the writer lease", self.uri, self.fs.delete_file, self.path)


def _utc(t: float | None) -> str:
    return datetime.fromtimestamp(t or 0, timezone.utc).isoformat(timespec="seconds")


class RunWriter:
    """The writer lock of one run directory; a context manager (`with RunWriter(run, operation="compile"):`).

    The lock of one run conflicts between processes and between two `RunWriter`s of one process alike
    (each opens the lock file itself).

    Args:
        run: The run directory.
        operation: What writes it ("compile", "prepare", "retrain"), named to the next one.
        wait_s: Seconds to wait for another writer to finish; 0 stops at once with `RunBusyError`.
        lease_s: Cloud runs: how long the lease lasts unrenewed (renewed every third of it).
    """

    def __init__(self, run: RunDir, *, operation: str, wait_s: float = 0.0, lease_s: float = DEFAULT_LEASE_S):
        self.run, self.wait_s, self.lease_s = run, wait_s, lease_s
        self.me = Writer.this_process(operation)
        self.file = _FileLock(run.path(LOCK_FILE))
        self.lease = _Lease(run.remote) if run.remote is not None else None
        self.lost: Writer | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.file.fd is not None

    def acquire(self) -> "RunWriter":
        """Takes the lock (and the lease), waiting up to `wait_s`; raises `RunBusyError` naming the holder.

        A lock this object already holds stays held (so `with writer:` around a held one releases it at the end).
        """
        if self.held:
            return self
        deadline, said = time.monotonic() + self.wait_s, False
        while True:
            holder = self.file.try_acquire(self.me)
            if holder is None and self.lease is not None:
                try:
                    holder = self.lease.try_acquire(self.me, self.lease_s)
                except BaseException:  # the bucket failed us: the run stays free for the next try, here too
                    self.file.release()
                    raise
                if holder is not None:
                    self.file.release()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise RunBusyError(self._busy_message(holder))
            if not said:
                log.info("run %s is written by %s; waiting up to %gs for it to finish", self.run.location,
                         holder.describe(), self.wait_s)
                said = True
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        if self.lease is not None:
            self._heartbeat = threading.Thread(target=self._renew, name="bootfinetune-lease", daemon=True)
            self._heartbeat.start()
        return self

    def _busy_message(self, holder: Writer) -> str:
        lease = (f" Its lease on {self.run.location} expires at {_utc(holder.expires)} unless renewed; a crashed "
                 f"writer's lease is taken over then." if self.lease is not None and holder.expires else "")
        return (f"run {self.run.location} is being written by {holder.describe()}.{lease} Let it finish (running "
                f"the same compile again afterwards resumes it), set writer_wait_s=<seconds> to wait for it, "
                f"or give this compile another run_name.")

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                current = self.lease.read()
                if current is None or current.token != self.me.token:
                    self.lost = current or Writer(host="?", pid=0, started="?", command="(lease deleted)",
                                                  what="writer", token="")
                    log.error("run %s: our writer lease was taken by %s; this writer stops at its next stage",
                              self.run.location, self.lost.describe())
                    return
                self.me.expires = time.time() + self.lease_s
                self.lease.write(self.me)
            except OSError as e:  # a network blip: try again at the next beat, while the lease still runs
                log.warning("run %s: renewing the writer lease failed (%s); retrying", self.run.location, e)

    def check(self) -> None:
        """Raises `RunBusyError` when the lease was taken over (this writer stalled past its expiry)."""
        if self.lost is not None:
            raise RunBusyError(f"run {self.run.location}: this writer's lease was taken over by "
                               f"{self.lost.describe()} (this process stalled longer than writer_lease_s="
                               f"{self.lease_s:g}); stopping so that two writers do not mix their files.")

    def release(self) -> None:
        """Stops the heartbeat, deletes our lease, unlocks the file. Safe to call twice."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self.lease is not None and self.lost is None:
            try:
                self.lease.delete_if_ours(self.me)
            except OSError as e:  # it expires on its own
                log.warning("run %s: could not delete the writer lease (%s); it expires in %gs",
                            self.run.location, e, self.lease_s)
        self.file.release()

    def __enter__(self) -> "RunWriter":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def writer_for(run: RunDir, run_options: Any, operation: str) -> RunWriter:
    """The writer lock of `run` with the wait and lease of `run_options` (a `config.RunOptions`)."""
    return RunWriter(run, operation=operation, wait_s=run_options.writer_wait_s, lease_s=run_options.writer_lease_s)
