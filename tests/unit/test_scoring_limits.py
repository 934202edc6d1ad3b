"""Scoring stops at the answer: the base student answers within the ceiling and prompt length its finetuned
self gets, and the answers cut at that limit are counted instead of DSPy warning once per call."""

import logging

import dspy
import pytest
from transformers import AutoTokenizer
from dspy.lm15 import Message, Response, Usage
from dspy.utils.exceptions import AdapterParseError

from bootfinetune.config import Config
from bootfinetune.run.jsonio import read_jsonl, write_jsonl
from bootfinetune.runtime import console
from bootfinetune.serving.limits import token_ceiling
from bootfinetune.serving.lm import finetuned_engine
from bootfinetune.stages.checks import check_program
from bootfinetune.stages.evaluate import batches_of, evaluate_program
from bootfinetune.stages.rebind import base_limits, base_program
from bootfinetune.stages.runner import cut_short
from bootfinetune.testing.tiny_models import build_tiny_causal, toy_records
from bootfinetune.training.render import answer_token_counts, encode_records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    target = build_tiny_causal(root / "base")
    write_jsonl(root / "all.jsonl", toy_records(24))
    return str(target), root / "all.jsonl"


def test_the_base_students_limits_come_from_the_teachers_answers_as_training_counts_them(tiny):
    target, data = tiny
    config = Config.from_options(target=target, max_length=64, max_tokens=512)
    limits = base_limits(target, data, (), config)
    encoded, _ = encode_records(AutoTokenizer.from_pretrained(target), read_jsonl(data), "causal", 64)
    counts = answer_token_counts(encoded)
    assert counts[-1] > 0 and limits.max_tokens_ceiling == token_ceiling(counts[-1], 512) < 512
    assert limits.max_length == 64 - counts[len(counts) // 2]  # what the manifest's prompt_max_length records
    assert base_limits(target, data, (), config.replace(max_tokens_ceiling=7)).max_tokens_ceiling == 7


def test_a_cut_answer_is_counted_from_its_finish_reason():
    def entry(reason):
        return {"response": [Response(id=None, model="m", message=Message.assistant("x"), finish_reason=reason,
                                      usage=Usage(input_tokens=1, output_tokens=1))]}

    assert cut_short(entry("length")) and not cut_short(entry("stop"))
    assert cut_short({"response": {"choices": [{"finish_reason": "length"}]}})
    assert not cut_short({"response": None})


def test_scoring_the_base_student_counts_cut_answers_and_prints_no_warning(tiny, caplog):
    target, data = tiny
    config = Config.from_options(target=target, max_length=64, max_tokens=512)
    student = dspy.Predict("question -> answer")
    plan = check_program(student, [student], target=target, multitask=True,
                         teacher_settings={"lm": dspy.LM("openai/unused", api_key="unused")})
    limits = {"all": base_limits(target, data, (), config)}
    program = base_program(student, plan, exclude_demos=False, inference=config.inference, limits=limits)
    engine = finetuned_engine(program.predictors()[0].lm)
    assert engine.ceiling == limits["all"].max_tokens_ceiling and engine.max_length == limits["all"].max_length
    examples = [dspy.Example(question=f"Repeat the word {w}.", answer=w).with_inputs("question")
                for w in ("apple", "river", "stone")]
    dspy_lm = logging.getLogger("dspy.clients.lm")
    dspy_lm.addFilter(console._REPEATS)  # as a compile has it (`set_console_output`): repeated warnings held back, counted
    try:
        with caplog.at_level(logging.WARNING):
            result = evaluate_program(program, examples, lambda e, p, t=None: p.answer == e.answer, use_ray=False)
    finally:
        dspy_lm.removeFilter(console._REPEATS)
    (usage,), = [result.usage.values()]
    # random weights never write ChatAdapter's markers: every answer runs to the ceiling and is cut
    assert usage["calls"] >= len(examples) and usage["cut"] == usage["calls"]
    assert usage["completion_tokens"] == usage["calls"] * limits["all"].max_tokens_ceiling
    assert not [r for r in caplog.records if "LM response was truncated" in r.getMessage()]
    assert not console._REPEATS.held.get(console.REPEATED[0])  # counted here, not held back for the end


def test_a_compile_reports_only_the_warnings_it_held_back(caplog):
    """A notebook or a test session runs several compiles in one process: warnings an earlier one held back (and
    never reported, e.g. it raised) are not reported again as the next compile's."""
    dspy_lm = logging.getLogger("dspy.clients.lm")
    console.set_console_output(False)
    try:
        for _ in range(3):
            dspy_lm.warning("LM response was truncated due to exceeding max_tokens=4.")  # an earlier compile's
        assert console._REPEATS.held[console.REPEATED[0]] == 2
        console.set_console_output(False)  # the next compile starts
        with caplog.at_level(logging.WARNING):
            console.report_held()
        assert not [r for r in caplog.records if "more warning(s)" in r.getMessage()]
    finally:
        console.set_console_output(True)


def test_scoring_threads_fill_the_finetuned_lms_batches_and_the_program_keeps_its_own_size(tiny):
    target, _ = tiny
    lm = bootfinetune_lm(target, batch_size=4)
    wide = bootfinetune_lm(target, batch_size=64)
    program = TwoPredicts(lm, wide)
    examples = [dspy.Example(question=f"Repeat the word w{i}.", answer=f"w{i}").with_inputs("question")
                for i in range(48)]
    engine, wide_engine = finetuned_engine(lm), finetuned_engine(wide)
    with batches_of(program, 16):
        assert (engine.batch_size, wide_engine.batch_size) == (16, 64)  # wider, never narrower
    assert (engine.batch_size, wide_engine.batch_size) == (4, 64)
    evaluate_program(program, examples, lambda e, p, t=None: 0.0, num_threads=16, use_ray=False)
    # the scoring threads' calls shared generate calls wider than the program's own
    assert 4 < max(engine._batcher.batch_sizes) <= 16 and engine.batch_size == 4
    engine._batcher.batch_sizes.clear()
    with pytest.raises(AdapterParseError):  # random weights write no answer field
        program(question="Repeat the word again.")  # the program handed back batches as it was built to
    assert engine.batch_size == 4 and set(engine._batcher.batch_sizes) == {1}


def bootfinetune_lm(target, batch_size):
    from bootfinetune.serving.lm import FinetunedLM

    return FinetunedLM(target, max_tokens=4, batch_size=batch_size)


class TwoPredicts(dspy.Module):
    def __init__(self, lm, other):
        super().__init__()
        self.first, self.second = dspy.Predict("question -> answer"), dspy.Predict("question -> answer")
        self.first.lm, self.second.lm = lm, other

    def forward(self, question):  # random weights: `first` raises (its answer does not parse), `second` never runs
        return self.second(question=self.first(question=question).answer)
