"""A compile whose storage_path is an s3:// URI on a real S3 API (moto's server on 127.0.0.1).

The run directory, Ray Train's checkpoints and the exported models go to the bucket; another
machine (another staging folder) loads the compiled program and resumes the run from the URI alone.
"""

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


def test_compile_to_s3_then_load_and_resume_elsewhere(ray_cluster, s3_server, tmp_path, monkeypatch):
    target = str(build_tiny_causal(tmp_path / "tiny-llama"))
    storage = s3_server.uri("runs", "team-a")
    monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-a"))
    options = dict(metric=two_step_metric, storage_path=storage, max_tokens=24, num_workers=2, zero_stage=2)
    inputs = [{"text": "item 901"}, {"text": "skip item 902"}]
    with TeacherServer(two_step_script) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="sk-s3-test-key", cache=False)
        tp = BootstrapFinetune(teacher_settings={"lm": teacher}, **options)
        compiled = tp.compile(TwoStep(), trainset=two_step_examples(16), valset=two_step_examples(6, offset=300),
                              target=target, epochs=2, bsize=4, lr=3e-3)
        calls = server.calls
        expected = greedy_outputs(compiled, inputs)

        run = tp.run_dir
        assert run.remote == s3_server.uri("runs", f"team-a/{run.name}")
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
        for name in names:  # the API key is in no file on the bucket
            assert b"sk-s3-test-key" not in _read(run.remote, name), name

        # Machine b: load from the URI alone; same greedy answers.
        monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-b"))
        loaded = bootfinetune.load(run.remote, program=TwoStep())
        assert finetuned_engine(loaded.rewrite.lm).model.startswith(str(tmp_path / "machine-b"))
        assert greedy_outputs(loaded, inputs) == expected

        # Machine c: the same compile resumes from the bucket: no teacher call, no training.
        monkeypatch.setenv("BOOTFINETUNE_STAGING", str(tmp_path / "machine-c"))
        tp2 = BootstrapFinetune(teacher_settings={"lm": teacher}, **options)
        again = tp2.compile(TwoStep(), trainset=two_step_examples(16), valset=two_step_examples(6, offset=300),
                            target=target, epochs=2, bsize=4, lr=3e-3)
        assert tp2.run_dir.remote == run.remote and tp2.run_dir.root != run.root
        assert server.calls == calls  # the bootstrap is read back, not asked again
        assert tp2.report["stages"]["bootstrap"]["resumed"] is True
        assert read_json(tp2.run_dir.model_dir("all") / "manifest.json")["job_fingerprint"] == manifest["job_fingerprint"]
        assert greedy_outputs(again, inputs) == expected


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
