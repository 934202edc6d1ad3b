"""Program, teacher and trainset checks: each error names the predictor or example and the fix."""

import threading

import dspy
import pytest

from bootfinetune.stages.checks import check_examples, check_picklable, check_program, valset_overlap
from bootfinetune.errors import ProgramError
from tests.programs import TwoStep, two_step_examples

LM = dspy.LM("openai/teacher", api_key="unused")


def plan_for(student, teachers=None, target="some/model", multitask=True, teacher_settings=None):
    return check_program(student, teachers or [student], target=target, multitask=multitask,
                         teacher_settings=teacher_settings if teacher_settings is not None else {"lm": LM})


def test_multitask_plan_shares_one_key():
    plan = plan_for(TwoStep())
    assert plan.predictors == ["rewrite", "answer.predict"]
    assert plan.key_of == {"rewrite": "all", "answer.predict": "all"}
    assert plan.target_of == {"all": "some/model"}


def test_per_predictor_plan_has_a_key_per_predictor():
    plan = plan_for(TwoStep(), multitask=False, target={"rewrite": "a", "answer.predict": "b"})
    assert plan.key_of == {"rewrite": "rewrite", "answer.predict": "answer.predict"}
    assert plan.target_of == {"rewrite": "a", "answer.predict": "b"}


def test_dspy3_style_lm_on_each_predictor_gives_the_target():
    student = TwoStep()
    student.rewrite.lm = dspy.LM("openai/local:/models/small-a")
    student.answer.predict.lm = dspy.LM("openai/local:/models/small-a")
    plan = plan_for(student, teachers=[TwoStep()], target=None)
    assert plan.target_of == {"all": "/models/small-a"}


def test_predictor_without_lm_or_target_is_named():
    with pytest.raises(ProgramError) as err:
        plan_for(TwoStep(), target={"rewrite": "a"})
    assert "'answer.predict' has no LM and no target" in str(err.value)


def test_target_dict_with_unknown_predictor():
    with pytest.raises(ProgramError) as err:
        plan_for(TwoStep(), target={"rewrite": "a", "answer.predict": "b", "answr": "c"})
    assert "'answr' is not a predictor" in str(err.value)


def test_teacher_with_other_predictors_is_rejected():
    class Other(dspy.Module):
        def __init__(self):
            super().__init__()
            self.rewrite = dspy.Predict("text -> rewritten")

        def forward(self, text):
            return self.rewrite(text=text)

    with pytest.raises(ProgramError) as err:
        plan_for(TwoStep(), teachers=[Other()])
    assert "missing ['answer.predict']" in str(err.value)


def test_teacher_signature_mismatch_is_named():
    teacher = TwoStep()
    teacher.rewrite = dspy.Predict("text -> summary")
    with pytest.raises(ProgramError) as err:
        plan_for(TwoStep(), teachers=[teacher])
    assert "predictor 'rewrite' has signature ['text'] -> ['summary']" in str(err.value)


def test_shared_predictor_object_is_rejected():
    student = TwoStep()
    teacher = TwoStep()
    teacher.answer = student.answer
    with pytest.raises(ProgramError) as err:
        plan_for(student, teachers=[teacher])
    assert "'answer.predict' is the same object" in str(err.value)


def test_teacher_without_any_lm_is_named():
    with dspy.context(lm=None):
        with pytest.raises(ProgramError) as err:
            plan_for(TwoStep(), teacher_settings={})
    assert "predictor 'rewrite' has no LM to run" in str(err.value)
    assert "teacher_settings={'lm': big_lm}" in str(err.value)


def test_global_lm_is_enough_for_the_teacher():
    with dspy.context(lm=LM):
        assert plan_for(TwoStep(), teacher_settings={}).keys() == ["all"]


def test_unknown_teacher_setting():
    with pytest.raises(ProgramError) as err:
        plan_for(TwoStep(), teacher_settings={"lm": LM, "temprature": 0})
    assert "temprature" in str(err.value)


def test_student_must_be_a_module_with_predictors():
    with pytest.raises(ProgramError, match="expected a dspy.Module"):
        plan_for("not a program")

    class Empty(dspy.Module):
        def forward(self, x):
            return x

    with pytest.raises(ProgramError, match="no dspy.Predict"):
        plan_for(Empty())


def test_examples_checks():
    program = TwoStep()
    assert check_examples(two_step_examples(3), program) == []
    assert "non-empty list" in check_examples([], program)[0]
    no_inputs = [dspy.Example(text="a", answer="b")]
    assert "call .with_inputs('text')" in check_examples(no_inputs, program)[0]
    wrong_inputs = [dspy.Example(question="a", answer="b").with_inputs("question")]
    assert "needs input(s) ['text']" in check_examples(wrong_inputs, program)[0]
    not_json = [dspy.Example(text="a", answer=object()).with_inputs("text")]
    assert "['answer']" in check_examples(not_json, program, "valset")[0]
    assert check_examples(not_json, program, "valset")[0].startswith("valset[0]")


def test_unpicklable_attribute_is_named():
    program = TwoStep()
    program.cache_lock = threading.Lock()
    problems = check_picklable(program, "teacher")
    assert problems and problems[0].startswith("teacher.cache_lock cannot be sent to Ray workers")
    assert check_picklable(TwoStep(), "teacher") == []


def test_valset_overlap_counts_shared_inputs():
    assert valset_overlap(two_step_examples(5), two_step_examples(5, offset=3)) == 2


def test_target_path_typo_and_unreachable_hub_id_are_told_apart(tmp_path, monkeypatch):
    from bootfinetune.common.targets import check_target
    from bootfinetune.testing.tiny_models import build_tiny_causal

    real = build_tiny_causal(tmp_path / "tiny-llama")
    assert check_target(str(real)) is None
    typo = check_target(str(tmp_path / "tiny-lama"))
    assert "no such directory" in typo and "Did you mean" in typo and "tiny-llama" in typo
    (tmp_path / "empty").mkdir()
    assert "without config.json" in check_target(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine with no network: nothing is fetched
    hub = check_target("google/flan-t5-base-not-cached")
    assert "hub id that cannot be fetched" in hub and "local model directory" in hub
