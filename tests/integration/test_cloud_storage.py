"""A compile whose storage_path is an s3:// URI on a real S3 API (moto's server on 127.0.0.1).

The run directory, Ray Train's checkpoints and the exported models go to the bucket; another
machine (another staging folder) loads the compiled program and resumes the run from the URI alone.
Credentials in every form (a header, `user:password@` in the teacher's `api_base`, access keys in the
storage URI) are found in no file of the run and in no log line of the compile.
"""

import logging

import dspy
import pytest

import bootfinetune
from bootfinetune import BootstrapFinetune
from bootfinetune.errors import ConfigError
from bootfinetune.run.jsonio import read_json
from bootfinetune.serving.lm import finetuned_engine
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.integration.test_compile import greedy_outputs
from tests.programs import TwoStep, two_step_examples, two_step_metric, two_step_script
from tests.unit.test_storage import remote_names

pytestmark = pytest.mark.integration


HEADER_KEY = "sk-hdr-i17-0123456789"
URL_PASSWORD = "pw-url-i17-424242"
URL_USER = "alice-i17"
ACCESS_KEY = "AKIA-i17-access"
SECRET_KEY = "s3-secret-i17-777"
API_KEY = "sk-s3-test-key"
SECRETS = [HEADER_KEY, URL_PASSWORD, URL_USER, ACCESS_KEY, SECRET_KEY]
OPTIONS = dict(metric=two_step_metric, max_tokens=24, num_workers=2, zero_stage=2)
COMPILE = dict(trainset=two_step_examples(16), valset=two_step_examples(6, offset=300), epochs=2, bsize=4, lr=3e-3)


@pytest.fixture(scope="module")
def s3_compile(ray_cluster, s3_server, tmp_path_factory):
    """One compile for the module's tests: to a bucket whose URI carries access keys (pyarrow takes S3 credentials
    as the URI's user info; moto accepts any), through a teacher reached with `user:password@` in its `api_base`
    and a key in a header. Every record of bootfinetune's loggers during it is kept, from a handler on its own
    logger (not through the root's, which the suite's earlier tests may have left otherwise)."""
    root = tmp_path_factory.mktemp("s3")
    target = str(build_tiny_causal(root / "tiny-llama"))
    storage = s3_server.uri("runs", "team-a").replace("s3://", f"s3://{ACCESS_KEY}:{SECRET_KEY}@")
    mp = pytest.MonkeyPatch()
    mp.setenv("BOOTFINETUNE_STAGING", str(root / "machine-a"))
    logger, records, handler = logging.getLogger("bootfinetune"), [], logging.Handler(logging.DEBUG)
    handler.emit = records.append
    saved = (logger.level, logger.disabled)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.disabled = False
    try:
        with TeacherServer(two_step_script) as server:
            base = server.url.replace("http://", f"http://{URL_USER}:{URL_PASSWORD}@")
            teacher = dspy.LM("openai/scripted-teacher", api_base=base, api_key=API_KEY,
                              extra_headers={"Authorization": f"Bearer {HEADER_KEY}"}, cache=False, num_retries=0)
            tp = BootstrapFinetune(teacher_settings={"lm": teacher}, storage_path=storage, **OPTIONS)
            compiled = tp.compile(TwoStep(), target=target, **COMPILE)
            logger.removeHandler(handler)
            yield dict(tp=tp, compiled=compiled, server=server, teacher=teacher, target=target, storage=storage,
                       root=root, records=records)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.disabled = saved[1]
        mp.undo()


def test_compile_to_s3_then_load_and_resume_elsewhere(s3_compile, s3_server, monkeypatch):
    tp, compiled, server, root = s3_compile["tp"], s3_compile["compiled"], s3_compile["server"], s3_compile["root"]
    inputs = [{"text": "item 901"}, {"text": "skip item 902"}]
    calls = server.calls
    assert calls > 0  # the teacher was reached through the credentialed URL
    expected = greedy_outputs(compiled, inputs)
    run = tp.run_dir
    assert run.remote == s3_compile["storage"].replace("team-a?", f"team-a/{run.name}?", 1)
    names = remote_names(run.remote)
    for name in ("config.json", "report.json", "report.html", "program.json", "data/all.jsonl",
                 "bootstrap/train.summary.json", "models/all/manifest.json", "models/all/model.safetensors",
                 "models/all/tokenizer.json"):
        assert name in names, name
    assert "writer.lease" not in names and "writer.lock" not in names  # released, and the lock stays local
    # Ray Train wrote its checkpoints to the bucket (from both workers' node), not to the mirror.
    manifest = read_json(run.model_dir("all") / "manifest.json")
    assert manifest["world_size"] == 2
    assert any(n.startswith("checkpoints/all/") and n.endswith(".pt") for n in names)
    assert not any(p.suffix == ".pt" for p in run.root.rglob("*"))
    # Machine b: load from the URI alone; same greedy answers.
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(root / "machine-b"))
    loaded = bootfinetune.load(run.remote, program=TwoStep())
    assert finetuned_engine(loaded.rewrite.lm).model.startswith(str(root / "machine-b"))
    assert greedy_outputs(loaded, inputs) == expected
    # Machine c: the same compile resumes from the bucket: no teacher call, no training.
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(root / "machine-c"))
    tp2 = BootstrapFinetune(teacher_settings={"lm": s3_compile["teacher"]}, storage_path=s3_compile["storage"],
                            **OPTIONS)
    again = tp2.compile(TwoStep(), target=s3_compile["target"], **COMPILE)
    assert tp2.run_dir.remote == run.remote and tp2.run_dir.root != run.root
    assert server.calls == calls  # the bootstrap is read back, not asked again
    assert tp2.report["stages"]["bootstrap"]["resumed"] is True
    assert read_json(tp2.run_dir.model_dir("all") / "manifest.json")["job_fingerprint"] == manifest["job_fingerprint"]
    assert greedy_outputs(again, inputs) == expected


def test_header_url_and_storage_credentials_reach_no_file_and_no_log(s3_compile, s3_server):
    """Credentials in every form stay out of the run: found in no file of it (bucket: run, checkpoints, trace
    store; the local mirrors of every machine) and in no log line of the compile."""
    from bootfinetune.entrypoints.retrain import prepare_retrain

    tp, root, storage = s3_compile["tp"], s3_compile["root"], s3_compile["storage"]
    run = tp.run_dir
    described = read_json(run.config_json)
    teacher_lm = described["teacher_settings_lm"]
    assert teacher_lm["kwargs"]["extra_headers"] == {"Authorization": "***"}
    assert teacher_lm["kwargs"]["api_base"].startswith("http://***@127.0.0.1:")
    assert described["options"]["run"]["storage_path"].startswith("s3://***@runs/team-a?endpoint_override=127.0.0.1:")

    def found_anywhere(secrets):
        found = [(name, s) for name in remote_names(s3_server.uri("runs", "team-a"))
                 for s in secrets if s.encode() in _read(s3_server.uri("runs", "team-a"), name)]
        return found + [(str(p), s) for p in root.glob("machine-*/**/*") if p.is_file()
                        for s in secrets if s.encode() in p.read_bytes()]

    assert not found_anywhere(SECRETS + [API_KEY])

    # Issue 30 (4): a retrain of that run, reached by its credentialed URI, writes config.json through the same
    # door (the new run beside it records a storage_path given as a resource option, with credentials).
    real = storage.replace("?", f"/{run.name}?", 1)
    ready = prepare_retrain(real, lr=1e-4, storage_path=storage)
    ready.writer.release()
    assert ready.run.name != run.name
    assert not found_anywhere(SECRETS)
    assert read_json(ready.run.config_json)["options"]["run"]["storage_path"].startswith("s3://***@runs/team-a?")
    logged = "\n".join(r.getMessage() for r in s3_compile["records"])
    assert "storage" in logged or run.name in logged  # the compile did log where it went
    assert not [s for s in SECRETS if s in logged], logged
    assert not [s for s in SECRETS if s in str(tp.report)]


def _read(uri, name):
    from bootfinetune.run.storage import filesystem

    fs, base = filesystem(uri)
    with fs.open_input_stream(f"{base}/{name}") as f:
        return f.read()


def test_unwritable_storage_fails_before_any_teacher_call(ray_cluster, s3_server, tmp_path):
    with TeacherServer(two_step_script) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="x", cache=False)
        tp = BootstrapFinetune(teacher_settings={"lm": teacher}, storage_path=s3_server.uri("missing-bucket", "r"))
        with pytest.raises(ConfigError, match="storage_path=.*missing-bucket"):
            tp.compile(TwoStep(), trainset=two_step_examples(4), target=str(build_tiny_causal(tmp_path / "m")))
        assert server.calls == 0
