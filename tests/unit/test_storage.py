"""bootfinetune.run.storage against a real S3 API (moto's server on 127.0.0.1): mirror, push, pull."""

import os
import time

import pytest

from bootfinetune.run.jsonio import read_json, write_json
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.storage import filesystem, is_uri, join_uri, mirror_of, pull, push


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.make_bucket("unit")
    return s3_server


def remote_names(uri):
    import pyarrow.fs as pafs

    fs, base = filesystem(uri)
    return sorted(f.path[len(base) + 1:] for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                  if f.type == pafs.FileType.File)


def test_uri_helpers():
    assert is_uri("gs://b/x") and not is_uri("relative/runs") and not is_uri("file:///tmp/runs")
    uri = "s3://b/runs?endpoint_override=127.0.0.1:9&scheme=http"
    assert join_uri(uri, "R-1", "models/all") == "s3://b/runs/R-1/models/all?endpoint_override=127.0.0.1:9&scheme=http"
    assert mirror_of(join_uri(uri, "R-1")).name == "R-1"
    assert mirror_of(join_uri(uri, "R-1")) != mirror_of(join_uri("s3://other/runs", "R-1"))


def test_push_pull_round_trip(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-a"))
    run = RunDir.at(s3.uri("unit", "runs"), "Prog-123")
    assert run.remote and run.root.is_relative_to(tmp_path / "machine-a") and run.root.name == "Prog-123"
    write_json(run.config_json, {"a": 1})
    write_json(run.model_dir("all") / "manifest.json", {"done": True})
    (run.model_dir("all") / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
    (run.model_dir("all") / "model.safetensors").write_bytes(os.urandom(3 << 20))
    write_json(run.checkpoints_dir() / "all" / "bootfinetune_job.json", {"job_fingerprint": "x"})
    assert run.push() == 4
    assert run.push() == 0  # nothing changed: nothing uploaded
    assert remote_names(run.remote) == [".bootfinetune_index.json", "checkpoints/all/bootfinetune_job.json", "config.json",
                                        "models/all/manifest.json", "models/all/model.safetensors"]

    # Another machine (another staging folder) reads the run back from the URI alone.
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-b"))
    other = RunDir.from_location(run.remote)
    assert other.root != run.root and other.pull() == 4
    assert (other.model_dir("all") / "model.safetensors").read_bytes() == \
        (run.model_dir("all") / "model.safetensors").read_bytes()
    assert other.pull() == 0

    # A change on machine b reaches machine a; machine a's untouched files stay as they are.
    write_json(other.config_json, {"a": 2})
    assert other.push() == 1
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-a"))
    assert run.pull() == 1 and read_json(run.config_json) == {"a": 2}


def test_markers_upload_last_and_checkpoints_stay_remote(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "s"))
    uri = s3.uri("unit", "order")
    local = tmp_path / "mirror"
    for name in ("models/k/manifest.json", "models/k/weights.bin", "report.json", "data/k.jsonl"):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_text(name)
    order = []
    import bootfinetune.run.storage as storage

    real = storage.filesystem

    class Recording:  # the real filesystem, noting the order in which files are opened for writing
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_output_stream(self, path, *a, **kw):
            order.append(path.split("/order/")[1])
            return self.fs.open_output_stream(path, *a, **kw)

    monkeypatch.setattr(storage, "filesystem", lambda u: (Recording(real(u)[0]), real(u)[1]))
    push(local, uri)
    monkeypatch.setattr(storage, "filesystem", real)
    # markers after the files they vouch for, the index after everything
    assert order[-3:] == ["models/k/manifest.json", "report.json", ".bootfinetune_index.json"]
    # Ray Train's checkpoint files on the URI are not pulled into a mirror (only job stamps are).
    fs, base = filesystem(uri)
    with fs.open_output_stream(f"{base}/checkpoints/k/checkpoint_000001/big.pt") as f:
        f.write(b"x" * 1000)
    fresh = tmp_path / "fresh"
    assert pull(uri, fresh) == 4
    assert not (fresh / "checkpoints").exists()


def test_unwritable_bucket_is_a_clear_error(s3):
    from bootfinetune.run.storage import check_writable

    problem = check_writable(s3.uri("no-such-bucket", "runs").replace("s3://", "s3://AKIA-u:sec-ret-42@"))
    assert problem and "storage_path=" in problem and "no-such-bucket" in problem
    assert "AKIA-u" not in problem and "sec-ret-42" not in problem  # credentials are left out of messages
    assert "endpoint_override=127.0.0.1" in problem  # the endpoint is shown: it is what to check
    assert check_writable(s3.uri("unit", "ok")) is None


def test_pull_refuses_an_object_whose_name_leaves_the_mirror(s3, tmp_path, monkeypatch):
    """An object key with `..` in it (S3 keys are plain strings) is never written outside the run's mirror."""
    import boto3

    from bootfinetune.run.paths import RunPathError

    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "staging" / "a" / "b"))
    run = RunDir.at(s3.uri("unit", "runs"), "Evil-1")
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    client.put_object(Bucket="unit", Key="runs/Evil-1/models/../../../../../escaped.txt", Body=b"x")
    with pytest.raises(RunPathError, match="outside the run directory"):
        run.pull()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


# -- issue 30 (8): pushes and pulls retry, bounded, and name the URI when they give up ---------------------

@pytest.fixture
def flaky(s3):
    from tests.s3server import FlakyProxy

    proxy = FlakyProxy(s3)
    yield proxy
    proxy.stop()


def test_a_bucket_that_fails_for_a_while_is_retried(flaky, tmp_path, monkeypatch, caplog):
    import bootfinetune.run.storage as storage

    monkeypatch.setattr(storage, "RETRY_DELAYS_S", (0.2, 0.2, 0.2))  # the S3 client's own retries take ~6 s a try
    local = tmp_path / "mirror"
    for name in ("config.json", "data/all.jsonl", "models/all/manifest.json"):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_text(name)
    uri = flaky.uri("unit", "flaky-run")
    for method, step in (("PUT", lambda: push(local, uri)), ("GET", lambda: pull(uri, tmp_path / "elsewhere"))):
        caplog.clear()
        flaky.failed = 0
        flaky.fail_next(40, method)  # more failures than the S3 client's own retries absorb (about 30 in 6 s)
        with caplog.at_level("WARNING", logger="bootfinetune"):
            assert step() == 3
        assert flaky.failed == 40
        assert any("attempt 2 of 4" in r.getMessage() for r in caplog.records)  # ours retried after the client's
    assert "models/all/manifest.json" in remote_names(uri)
    assert (tmp_path / "elsewhere" / "config.json").read_text() == "config.json"


def test_a_bucket_that_keeps_failing_is_given_up_on_in_bounded_time_naming_the_uri(flaky, tmp_path, monkeypatch):
    import bootfinetune.run.storage as storage
    from bootfinetune.run.storage import StorageError

    monkeypatch.setattr(storage, "RETRY_DELAYS_S", (0.2,))  # the S3 client's own retries take ~6 s a try
    local = tmp_path / "mirror"
    local.mkdir()
    (local / "config.json").write_text("{}")
    flaky.always_fail = True
    uri = flaky.uri("unit", "down").replace("s3://", "s3://AKIA-down:down-secret-77@")
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        push(local, uri)
    assert time.monotonic() - started < 60
    message = str(err.value)
    assert "s3://***@unit/down?endpoint_override=127.0.0.1:" in message and "down-secret-77" not in message
    assert "AKIA-down" not in message and "gave up after 2 attempts" in message


def test_cannot_write_there_names_a_uri_whose_secret_has_an_unencoded_slash_without_it(s3):
    """Issue 30 (1): the secret came back in the 'cannot write there' error (urlsplit missed the '@')."""
    from bootfinetune.run.storage import check_writable

    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    problem = check_writable(s3.uri("unit", "runs").replace("s3://", f"s3://AKIAIOSFODNN7EXAMPLE:{secret}@"))
    assert problem and "storage_path='s3://***@unit/runs?endpoint_override=127.0.0.1:" in problem
    assert not [part for part in ["AKIAIOSFODNN7EXAMPLE", *secret.split("/")] if part in problem], problem
