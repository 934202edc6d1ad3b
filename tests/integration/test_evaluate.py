"""Evaluation spread over Ray Data actors agrees with evaluation in this process."""

import dspy
import pytest

from bootfinetune.stages.evaluate import evaluate_program
from bootfinetune.serving.lm import FinetunedEngine, FinetunedLM
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.programs import TwoStep, two_step_examples, two_step_metric

pytestmark = pytest.mark.integration


def expected_two_step_score(examples):
    """What the script implies: branch examples are right, 'bad' ones wrong, 'boom' ones fail (count 0)."""
    right = sum(1 for ex in examples if ex.text.startswith("skip") or ex.text.startswith("item"))
    return round(right / len(examples), 6)


def test_ray_and_local_evaluation_agree(ray_cluster, teacher_lm, teacher_server):
    booms = [dspy.Example(text=f"boom {i}", answer="X").with_inputs("text") for i in range(2)]
    examples = two_step_examples(40) + booms
    program = TwoStep()
    program.set_lm(teacher_lm)
    local = evaluate_program(program, examples, two_step_metric, use_ray=False, num_threads=8)
    calls_local = teacher_server.calls
    remote = evaluate_program(program, examples, two_step_metric, use_ray=True, num_actors=2, num_threads=4)
    assert (local.score, local.failed, local.examples) == (remote.score, remote.failed, remote.examples)
    # 40 examples: 6 take the branch, 7 get a wrong answer; the 2 'boom' examples fail.
    assert local.score == expected_two_step_score(examples) == round(33 / 42, 6)
    assert local.failed == 2 and local.examples == 42
    assert teacher_server.calls == 2 * calls_local  # the actors made the same calls, no more


def test_settings_from_dspy_configure_reach_the_actors(ray_cluster, teacher_lm):
    examples = two_step_examples(10)
    with dspy.context(lm=teacher_lm):  # no LM on the program: the driver's setting must travel
        remote = evaluate_program(TwoStep(), examples, two_step_metric, use_ray=True, num_actors=2)
    assert remote.failed == 0 and remote.score == expected_two_step_score(examples)


class Echo(dspy.Module):
    """One predictor whose LM is called directly (a tiny model's text would not parse as fields)."""

    def __init__(self, lm):
        super().__init__()
        self.say = dspy.Predict("text -> answer")
        self.say.lm = lm

    def forward(self, text):
        return dspy.Prediction(answer=self.say.lm(text)[0])


def test_finetuned_lm_pickles_to_actors_and_loads_there(ray_cluster, tmp_path):
    model_dir = str(build_tiny_causal(tmp_path / "tiny-llama"))
    texts = [f"Repeat the word {w}." for w in ("apple", "river", "stone", "cloud", "maple", "tiger")]
    local = FinetunedEngine(model_dir, max_tokens=8)
    expected = {t: local.generate([[{"role": "user", "content": t}]])[0] for t in texts}

    def metric(example, prediction, trace=None):
        return prediction.answer == expected[example.text]

    examples = [dspy.Example(text=t).with_inputs("text") for t in texts]
    # One thread per actor: each prompt is generated alone, as `expected` was, so greedy text matches exactly.
    result = evaluate_program(Echo(FinetunedLM(model_dir, max_tokens=8)), examples, metric, use_ray=True,
                              num_actors=2, num_threads=1)
    assert (result.score, result.failed, result.examples) == (1.0, 0, len(texts))
