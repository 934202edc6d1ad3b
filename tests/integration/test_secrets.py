"""Credentials in every form stay out of the run: a header, `user:password@` in the teacher's
`api_base`, and access keys in the storage URI are found in no file of the run (bucket,
local mirror, trace store) and in no log line of the compile."""

import logging

import dspy
import pytest

from bootfinetune import BootstrapFinetune
from bootfinetune.run.jsonio import read_json
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.integration.test_cloud_storage import _read
from tests.programs import TwoStep, two_step_examples, two_step_metric, two_step_script
from tests.unit.test_storage import remote_names

pytestmark = pytest.mark.integration

HEADER_KEY = "sk-hdr-i17-0123456789"
URL_PASSWORD = "pw-url-i17-424242"
URL_USER = "alice-i17"
ACCESS_KEY = "AKIA-i17-access"
SECRET_KEY = "s3-secret-i17-777"
SECRETS = [HEADER_KEY, URL_PASSWORD, URL_USER, ACCESS_KEY, SECRET_KEY]


def test_header_url_and_storage_credentials_reach_no_file_and_no_log(ray_cluster, s3_server, tmp_path, monkeypatch):
    target = str(build_tiny_causal(tmp_path / "tiny-llama"))
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "staging"))
    # pyarrow takes S3 credentials as the URI's user info (moto accepts any)
    storage = s3_server.uri("runs", "secrets").replace("s3://", f"s3://{ACCESS_KEY}:{SECRET_KEY}@")
    # Every record of bootfinetune's loggers, from a handler on its own logger (not through the root's, which
    # the suite's earlier tests may have left otherwise).
    logger, records, handler = logging.getLogger("bootfinetune"), [], logging.Handler(logging.DEBUG)
    handler.emit = records.append
    saved = (logger.level, logger.disabled)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.disabled = False
    with TeacherServer(two_step_script) as server:
        base = server.url.replace("http://", f"http://{URL_USER}:{URL_PASSWORD}@")
        teacher = dspy.LM("openai/scripted-teacher", api_base=base, api_key="sk-i17-plain-key",
                          extra_headers={"Authorization": f"Bearer {HEADER_KEY}"}, cache=False, num_retries=0)
        tp = BootstrapFinetune(metric=two_step_metric, teacher_settings={"lm": teacher}, storage_path=storage,
                               max_tokens=16)
        tp.compile(TwoStep(), trainset=two_step_examples(8), target=target, epochs=1, bsize=4)
        assert server.calls > 0  # the teacher was reached through the credentialed URL

    run = tp.run_dir
    described = read_json(run.config_json)
    teacher_lm = described["teacher_settings_lm"]
    assert teacher_lm["kwargs"]["extra_headers"] == {"Authorization": "***"}
    assert teacher_lm["kwargs"]["api_base"].startswith("http://***@127.0.0.1:")
    assert described["options"]["run"]["storage_path"].startswith("s3://***@runs/secrets?endpoint_override=127.0.0.1:")

    found = []
    for name in remote_names(s3_server.uri("runs", "secrets")):  # the bucket: run, checkpoints, trace store
        data = _read(s3_server.uri("runs", "secrets"), name)
        found += [(name, s) for s in SECRETS + ["sk-i17-plain-key"] if s.encode() in data]
    for path in (tmp_path / "staging").rglob("*"):  # the local mirrors
        if path.is_file():
            data = path.read_bytes()
            found += [(str(path), s) for s in SECRETS + ["sk-i17-plain-key"] if s.encode() in data]
    assert not found, found

    # Issue 30 (4): a retrain of that run, reached by its credentialed URI, writes config.json through the same
    # door (the new run beside it records a storage_path given as a resource option, with credentials).
    from bootfinetune.entrypoints.retrain import prepare_retrain

    real = storage.replace("?", f"/{run.name}?", 1)
    ready = prepare_retrain(real, lr=1e-4, storage_path=storage)
    ready.writer.release()
    assert ready.run.name != run.name
    found = [(str(p), s) for p in (tmp_path / "staging").rglob("*") if p.is_file()
             for s in SECRETS if s.encode() in p.read_bytes()]
    assert not found, found
    assert read_json(ready.run.config_json)["options"]["run"]["storage_path"].startswith("s3://***@runs/secrets?")
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.disabled = saved[1]
    logged = "\n".join(r.getMessage() for r in records)
    assert "storage" in logged or run.name in logged  # the compile did log where it went
    assert not [s for s in SECRETS if s in logged], logged
    assert not [s for s in SECRETS if s in str(tp.report)]


def test_a_provider_run_on_a_credentialed_bucket_writes_no_credential(ray_cluster, s3_server, tmp_path, monkeypatch):
    """Issue 30 (4): the provider wrote its options to config.json around the redaction a compile applied."""
    from bootfinetune import RayFinetuneProvider
    from bootfinetune.testing.tiny_models import toy_records

    target = str(build_tiny_causal(tmp_path / "tiny-llama"))
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "staging"))
    storage = s3_server.uri("runs", "provider").replace("s3://", f"s3://{ACCESS_KEY}:{SECRET_KEY}@")
    provider = RayFinetuneProvider(storage_path=storage, max_length=128)
    rows, train_kwargs = [{"messages": r["messages"]} for r in toy_records(8)], {"epochs": 1, "bsize": 8}
    run = provider.run_dir(provider.config(f"openai/local:{target}", train_kwargs), rows)
    provider.finetune(None, f"openai/local:{target}", rows, "chat", train_kwargs)
    assert read_json(run.config_json)["options"]["run"]["storage_path"].startswith("s3://***@runs/provider?")
    names = remote_names(s3_server.uri("runs", "provider"))
    assert f"{run.name}/config.json" in names and f"{run.name}/models/all/manifest.json" in names
    found = [(name, s) for name in names for s in (ACCESS_KEY, SECRET_KEY)
             if s.encode() in _read(s3_server.uri("runs", "provider"), name)]
    found += [(str(p), s) for p in (tmp_path / "staging").rglob("*") if p.is_file()
              for s in (ACCESS_KEY, SECRET_KEY) if s.encode() in p.read_bytes()]
    assert not found, found
