"""Bad input stops a compile before any teacher call, with the field and the fix named."""

import dspy
import pytest

from bootfinetune import BootstrapFinetune
from bootfinetune.errors import ConfigError, ProgramError
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.programs import TwoStep, two_step_examples, two_step_script

pytestmark = pytest.mark.integration


def test_bad_targets_and_options_fail_before_the_teacher_is_called(tmp_path, monkeypatch):
    real = build_tiny_causal(tmp_path / "tiny-llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with TeacherServer(two_step_script) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="x", cache=False)
        tp = BootstrapFinetune(teacher_settings={"lm": teacher}, storage_path=str(tmp_path / "runs"))
        with pytest.raises(ProgramError, match="no such directory.*Did you mean.*tiny-llama"):
            tp.compile(TwoStep(), trainset=two_step_examples(4), target=str(tmp_path / "tiny-lama"))
        with pytest.raises(ProgramError, match="hub id that cannot be fetched"):
            tp.compile(TwoStep(), trainset=two_step_examples(4), target="t5-large")
        with pytest.raises(ProgramError, match="non-empty list"):
            tp.compile(TwoStep(), trainset=[], target=str(real))
        with pytest.raises(ConfigError) as err:
            tp.compile(TwoStep(), trainset=two_step_examples(4), target=str(real), bsize=0, lr=5, epochs=-1)
        assert all(name in str(err.value) for name in ("bsize=0", "lr=5", "epochs=-1"))
        with pytest.raises(ConfigError, match="Did you mean 'num_workers'"):
            BootstrapFinetune(teacher_settings={"lm": teacher}, num_worker=2)
        assert server.calls == 0
    assert not (tmp_path / "runs").exists()  # nothing written either


def test_valset_overlapping_the_trainset_is_a_warning_naming_the_count(s3_server, tmp_path, caplog):
    real = build_tiny_causal(tmp_path / "tiny")
    with TeacherServer(two_step_script) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="x", cache=False)
        # The bucket does not exist: the compile stops right after the checks, before any teacher call.
        tp = BootstrapFinetune(teacher_settings={"lm": teacher}, storage_path=s3_server.uri("no-bucket", "r"))
        with caplog.at_level("WARNING", logger="bootfinetune"), pytest.raises(ConfigError, match="storage_path"):
            tp.compile(TwoStep(), trainset=two_step_examples(6), valset=two_step_examples(4, offset=3),
                       target=str(real))
        assert server.calls == 0
    assert any("valset: 3 example(s) have the same inputs as trainset examples" in r.message for r in caplog.records)


def test_models_load_from_safetensors_only(tmp_path):
    from transformers import AutoModelForCausalLM

    from bootfinetune.serving.lm import FinetunedEngine

    real = build_tiny_causal(tmp_path / "tiny")
    pickled = tmp_path / "bin-only"
    import shutil

    import torch

    shutil.copytree(real, pickled)
    state = AutoModelForCausalLM.from_pretrained(real).state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")  # the same weights as a pickle
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    messages = [{"role": "user", "content": "hi"}]
    assert isinstance(FinetunedEngine(str(real), device="cpu", max_tokens=2).generate([messages])[0], str)
    with pytest.raises(OSError, match="safetensors"):
        FinetunedEngine(str(pickled), device="cpu", max_tokens=2).generate([messages])
