"""One writer per run, with real processes: the local flock, the lease on a real S3 API (moto on
127.0.0.1), and the trace store written by two processes (and two machines) at once."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootfinetune.errors import RunBusyError
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.writer import LEASE_FILE, LOCK_FILE, RunWriter, Writer, _Lease
from tests.unit.test_storage import remote_names

HOLDER = """
import sys, time
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.writer import RunWriter
writer = RunWriter(RunDir.from_location(sys.argv[1]), operation="compile", lease_s=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[3]))
writer.release()
print("released", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holders():
    """Starts processes that hold a run's writer lock; kills what is left of them at the end."""
    started = []

    def start(location, *, lease_s=180.0, hold_s=600.0, staging=None):
        env = {**os.environ, **({"BOOTFINETUNE_STAGING": str(staging)} if staging else {})}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(location), str(lease_s), str(hold_s)],
                                stdout=subprocess.PIPE, text=True, env=env)
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def named(proc) -> str:
    return f"pid {proc.pid} on {socket.gethostname()}, started 20"


def test_a_second_writer_stops_at_once_naming_the_first_and_a_killed_one_blocks_nothing(tmp_path, holders):
    run = RunDir(tmp_path / "Prog-1")
    holder = holders(run.root)
    started = time.monotonic()
    with pytest.raises(RunBusyError) as busy:
        RunWriter(run, operation="compile").acquire()
    assert time.monotonic() - started < 2  # the default: no wait
    message = str(busy.value)
    assert f"is being written by a compile, {named(holder)}" in message
    assert str(run.root) in message and "writer_wait_s" in message and "run_name" in message
    assert Writer.from_json((run.root / LOCK_FILE).read_text()).pid == holder.pid  # the info file names it

    holder.send_signal(signal.SIGKILL)  # a crashed writer: the kernel drops its flock
    holder.wait()
    started = time.monotonic()
    with RunWriter(run, operation="compile"):
        assert time.monotonic() - started < 2
        assert Writer.from_json((run.root / LOCK_FILE).read_text()).pid == os.getpid()
    assert (run.root / LOCK_FILE).read_text() == ""  # released: nobody named


def test_a_waiting_writer_starts_when_the_first_finishes_within_its_wait(tmp_path, holders):
    run = RunDir(tmp_path / "Prog-1")
    holder = holders(run.root, hold_s=2.5)
    started = time.monotonic()
    with pytest.raises(RunBusyError, match=f"pid {holder.pid}"):
        RunWriter(run, operation="compile", wait_s=0.6).acquire()
    assert 0.6 <= time.monotonic() - started < 3
    with RunWriter(run, operation="compile", wait_s=60):
        waited = time.monotonic() - started
    assert holder.stdout.readline().strip() == "released"
    assert 1.5 < waited < 20  # it waited for the release, not for its whole wait_s


def test_two_writers_in_one_process_exclude_each_other(tmp_path):
    run = RunDir(tmp_path / "Prog-1")
    first = RunWriter(run, operation="compile").acquire()
    assert first.acquire() is first and first.held  # acquiring a held lock keeps it
    with pytest.raises(RunBusyError, match=f"a compile, pid {os.getpid()}"):
        RunWriter(run, operation="retrain").acquire()
    first.release()
    first.release()  # twice is harmless
    with RunWriter(run, operation="retrain") as second:
        assert second.held
    RunWriter(RunDir(tmp_path / "Prog-2"), operation="compile").acquire().release()  # another run: its own lock


def test_retrain_takes_the_lock_before_writing_and_holds_it_for_the_training(tmp_path, holders):
    from bootfinetune.config import Config
    from bootfinetune.entrypoints.retrain import prepare_retrain

    run = RunDir(tmp_path / "TwoStep-abc")
    run.data_dir.mkdir(parents=True)
    run.data_file("all").write_text("")
    described = json.dumps({"options": Config.from_options(target="some/model").to_dict(),
                            "model_keys": {"all": {"target": "some/model", "predictors": ["rewrite"]}}})
    run.config_json.write_text(described)
    holder = holders(run.root)
    with pytest.raises(RunBusyError, match=f"pid {holder.pid}"):
        prepare_retrain(str(run.root), cpus_per_worker=2.0)  # a resource option: trained in place
    assert run.config_json.read_text() == described and not run.report_json.exists()  # nothing written
    holder.kill()
    holder.wait()
    ready = prepare_retrain(str(run.root), cpus_per_worker=2.0)
    assert ready.run == run and ready.writer.held and run.report_json.exists()
    with pytest.raises(RunBusyError, match="a retrain, pid"):
        RunWriter(run, operation="compile").acquire()
    with ready.writer:  # what retrain() and the finetune job do around the training
        pass
    RunWriter(run, operation="compile").acquire().release()


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.make_bucket("writers")
    return s3_server


def lease_on(run: RunDir) -> Writer | None:
    return _Lease(run.remote).read()


def test_an_expired_lease_of_a_killed_writer_is_taken_over(s3, tmp_path, monkeypatch, holders):
    uri = s3.uri("writers", "runs/Prog-1")
    holder = holders(uri, lease_s=3, staging=tmp_path / "machine-a")
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-b"))
    run = RunDir.from_location(uri)
    assert lease_on(run).pid == holder.pid
    holder.send_signal(signal.SIGKILL)  # no release: its lease stays on the bucket until it expires
    holder.wait()
    with pytest.raises(RunBusyError) as busy:
        RunWriter(run, operation="compile").acquire()
    assert named(holder) in str(busy.value) and "lease" in str(busy.value) and "expires at" in str(busy.value)

    started = time.monotonic()
    with RunWriter(run, operation="compile", wait_s=30) as writer:
        assert time.monotonic() - started < 10
        assert lease_on(run).token == writer.me.token and lease_on(run).pid == os.getpid()
    assert lease_on(run) is None  # released: deleted


def test_a_live_lease_is_renewed_and_a_writer_whose_lease_was_taken_stops(s3, tmp_path, monkeypatch):
    uri = s3.uri("writers", "runs/Prog-2")
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-a"))
    a = RunWriter(RunDir.from_location(uri), operation="compile", lease_s=2).acquire()
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-b"))
    run_b = RunDir.from_location(uri)
    assert run_b.root != a.run.root  # two machines: only the lease is shared
    time.sleep(3)  # past the first expiry: the heartbeat renewed it
    with pytest.raises(RunBusyError, match=f"pid {os.getpid()}"):
        RunWriter(run_b, operation="compile").acquire()
    a.check()

    # a stalled past its lease and another writer took over: a notices at its next beat and stops.
    other = Writer.this_process("compile")
    other.expires = time.time() + 600
    _Lease(uri).write(other)
    deadline = time.time() + 5
    while a.lost is None and time.time() < deadline:
        time.sleep(0.1)
    with pytest.raises(RunBusyError, match="lease was taken over"):
        a.check()
    a.release()
    assert lease_on(run_b).token == other.token  # not ours any more: left alone


def test_lock_and_lease_are_never_synced(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-a"))
    run = RunDir.from_location(s3.uri("writers", "runs/Prog-3"))
    with RunWriter(run, operation="compile"):
        (run.root / "config.json").write_text("{}")
        run.push()
        assert (run.root / LOCK_FILE).exists()
        assert remote_names(run.remote) == [".bootfinetune_index.json", "config.json", LEASE_FILE]
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-b"))
    other = RunDir.from_location(run.remote)
    with RunWriter(run, operation="compile", lease_s=60):
        assert other.pull() == 1 and sorted(p.name for p in other.root.iterdir()) == [".bootfinetune_sync.json",
                                                                                         "config.json"]


STORE_WRITER = """
import os, sys, time
from bootfinetune.run.trace_store import TraceStore
storage, tag, go, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = TraceStore.at(storage, "Prog", {"x": 1})
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
with store.appender() as out:
    for i in range(n):
        out.add(f"{tag}-{i}", 0, {"calls": [{"text": tag * 20000, "i": i}], "kept": True})
        if i % 10 == 9:
            store.push_own_results()
store.push_own_results()
"""


def write_together(storage: str, tmp_path: Path, n: int, stagings=(None, None)) -> None:
    """Two processes append `n` results each (20 KB lines) to one trace store, released at the same instant."""
    go = tmp_path / "go"
    procs = []
    for tag, staging in zip("ab", stagings):
        env = {**os.environ, **({"BOOTFINETUNE_STAGING": str(staging)} if staging else {})}
        procs.append(subprocess.Popen([sys.executable, "-c", STORE_WRITER, storage, tag, str(go), str(n)],
                                      stdout=subprocess.PIPE, text=True, env=env))
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    for proc in procs:
        assert proc.wait(timeout=120) == 0


def check_results(loaded: dict, n: int) -> None:
    assert len(loaded) == 2 * n
    for tag in "ab":
        for i in range(n):
            assert loaded[(f"{tag}-{i}", 0)]["calls"] == [{"text": tag * 20000, "i": i}]


def test_two_processes_write_one_trace_store_at_once(tmp_path):
    from bootfinetune.run.trace_store import TraceStore

    write_together(str(tmp_path / "runs"), tmp_path, 200)
    store = TraceStore.at(str(tmp_path / "runs"), "Prog", {"x": 1})
    assert len(list((store.root / "results").glob("*.jsonl"))) == 2  # one file per writer
    check_results(store.load(), 200)


def test_two_machines_write_one_trace_store_on_s3_at_once(s3, tmp_path, monkeypatch):
    from bootfinetune.run.trace_store import TraceStore

    storage = s3.uri("writers", "shared")
    write_together(storage, tmp_path, 30, stagings=(tmp_path / "machine-a", tmp_path / "machine-b"))
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-c"))
    store = TraceStore.at(storage, "Prog", {"x": 1})  # pulls what both machines uploaded
    check_results(store.load(), 30)
    identity = json.loads((store.root / "identity.json").read_text())
    assert set(identity) == {"trace_id", "parts"}


# -- issue 30: the run lock and the files -------------------------------------------------------------

def test_the_lock_names_its_holder_without_the_credentials_on_its_command_line(tmp_path):
    run = RunDir(tmp_path / "Prog-1")
    secrets = ("sk-lock-0123456789", "bearer-lock-0123456789")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run.root), "180", "600", "--api-key", secrets[0],
                             "-H", f"Authorization: Bearer {secrets[1]}"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunBusyError) as busy:
            RunWriter(run, operation="compile").acquire()
        recorded = (run.root / LOCK_FILE).read_text()
        for text in (str(busy.value), recorded):
            assert f"pid {proc.pid}" in text or str(proc.pid) in text
            assert not [s for s in secrets if s in text], text
        assert "--api-key ***" in str(busy.value) and "-H ***" in str(busy.value)
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_left_alone(tmp_path):
    from bootfinetune.run.paths import RunPathError

    run = RunDir(tmp_path / "Prog-1")
    run.root.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run.root / LOCK_FILE).symlink_to(victim)
    with pytest.raises(RunPathError, match="link"):
        RunWriter(run, operation="compile").acquire()
    assert victim.read_text() == "precious"
    (run.root / LOCK_FILE).unlink()
    os.link(victim, run.root / LOCK_FILE)  # a hard link to someone's file: refused too
    with pytest.raises(RunPathError, match="link"):
        RunWriter(run, operation="compile").acquire()
    assert victim.read_text() == "precious"


class _Failing(__import__("http.server").server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 503 (a bucket in trouble)."""

    def _fail(self):
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _fail

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_s3():
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"s3://runs/team?endpoint_override=127.0.0.1:{server.server_address[1]}&scheme=http"
    server.shutdown()
    server.server_close()


def test_a_lease_that_fails_releases_the_local_lock(failing_s3, tmp_path, monkeypatch):
    import bootfinetune.run.storage as storage
    from bootfinetune.run.writer import _FileLock

    monkeypatch.setattr(storage, "RETRY_DELAYS_S", ())  # one attempt: the S3 client's own retries take seconds
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "staging"))
    run = RunDir.at(failing_s3, "Prog-1")
    with pytest.raises(storage.StorageError, match="writer lease"):
        RunWriter(run, operation="compile").acquire()
    lock = _FileLock(run.root / LOCK_FILE)
    assert lock.try_acquire(Writer.this_process("compile")) is None  # not held by the failed writer
    lock.release()


def test_an_evaluation_takes_the_run_lock_before_reading_the_run(tmp_path, holders):
    """Issue 30 (7): evaluate_run updated report.json and synced without the lock (lost updates, stale pushes)."""
    from bootfinetune.pipeline import evaluate_run

    run = RunDir(tmp_path / "Prog-1")
    holder = holders(run.root)
    with pytest.raises(RunBusyError, match=f"pid {holder.pid}"):
        evaluate_run(str(run.root), [], lambda *a: 1.0, name="held")
    assert not run.report_json.exists() and not (run.root / "evaluations").exists()


def test_the_trace_store_is_uploaded_as_it_grows(s3, tmp_path, monkeypatch):
    """Issue 30 (8): results reached the bucket only when the bootstrap ended; a killed driver lost them all."""
    import shutil

    from bootfinetune.run.trace_store import TraceStore

    storage = s3.uri("writers", "growing")
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-a"))
    store = TraceStore.at(storage, "Prog", {"x": 2})
    appender = store.appender(upload_every=3, upload_s=3600).__enter__()
    for i in range(7):
        appender.add(f"e{i}", 0, {"calls": [], "kept": True})
    # the driver dies here (its mirror with it): what the bucket holds is what a resume finds
    shutil.rmtree(tmp_path / "machine-a")
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-b"))
    assert sorted(k for k, _ in TraceStore.at(storage, "Prog", {"x": 2}).load()) == [f"e{i}" for i in range(6)]

    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-c"))
    store = TraceStore.at(storage, "Prog", {"x": 3})
    with store.appender(upload_every=1000, upload_s=0.5) as appender:
        appender.add("t0", 0, {"calls": [], "kept": True})
        time.sleep(0.6)
        appender.add("t1", 0, {"calls": [], "kept": True})  # half a second since the last upload: up it goes
        monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-d"))
        assert sorted(k for k, _ in TraceStore.at(storage, "Prog", {"x": 3}).load()) == ["t0", "t1"]
