"""Bad input stops a compile before any teacher call, with the field and the fix named."""

import dspy
import pytest

from bootfinetune import BootstrapFinetune
from bootfinetune.errors import ConfigError, ProgramError
from bootfinetune.teacher_server import TeacherServer
from bootfinetune.tiny_models import build_tiny_causal
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
