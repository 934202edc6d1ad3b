"""A provider run on a credentialed bucket writes no credential. (A compile's credentials in every form are
checked on the compile of tests/integration/test_cloud_storage.py, which runs on such a bucket.)"""

import pytest

from bootfinetune.run.jsonio import read_json
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.integration.test_cloud_storage import ACCESS_KEY, SECRET_KEY, _read
from tests.unit.test_storage import remote_names

pytestmark = pytest.mark.integration


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
