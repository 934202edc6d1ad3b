"""The actor's callable class and the data stage, run in this process (no Ray)."""

import json
import uuid

import dspy
import pytest

from bootfinetune.stages.bootstrap import TeacherRunner, is_kept
from bootfinetune.stages.checks import check_program
from bootfinetune.stages.datasets import build_datasets
from bootfinetune.run.jsonio import read_jsonl
from bootfinetune.run.records import CallRecord, example_to_json
from bootfinetune.run.rundir import RunDir
from tests.programs import TwoStep, two_step_examples, two_step_metric


def run_examples(runner, examples):
    batch = {"example_index": list(range(len(examples))), "example": [example_to_json(e) for e in examples]}
    out = runner(batch)
    return [json.loads(r) for r in out["result"]]


def test_trace_steps_are_attributed_by_name_in_loops_and_branches(teacher_lm):
    runner = TeacherRunner([TwoStep()], metric=two_step_metric, teacher_settings={"lm": teacher_lm}, num_threads=4)
    examples = two_step_examples(4)  # 0..2 plain, 3 takes the branch
    results = run_examples(runner, examples)
    assert [c["predictor"] for c in results[0]["calls"]] == ["rewrite", "rewrite", "answer.predict"]
    assert [c["predictor"] for c in results[3]["calls"]] == ["rewrite", "rewrite"]
    first = results[0]["calls"]
    assert first[0]["inputs"] == {"text": "item 0"} and first[0]["outputs"] == {"rewritten": "item 0!"}
    assert first[1]["inputs"] == {"text": "item 0!"}
    assert first[2]["outputs"] == {"reasoning": "upper-case item 0!!", "answer": "ITEM 0!!"}
    assert [c["call_index"] for c in first] == [0, 1, 2]
    assert all(r["kept"] for r in results) and results[0]["teacher_calls"] == 3


def test_metric_gets_the_real_trace_and_float_threshold(teacher_lm):
    seen = []

    def metric(example, prediction, trace):
        seen.append([(type(step[0]).__name__, sorted(step[1])) for step in trace])
        return 0.75 if prediction.answer == example.answer else 0.25

    examples = two_step_examples(5)  # example 4 gets a wrong answer from the teacher
    strict = TeacherRunner([TwoStep()], metric=metric, teacher_settings={"lm": teacher_lm}, metric_threshold=0.8)
    loose = TeacherRunner([TwoStep()], metric=metric, teacher_settings={"lm": teacher_lm}, metric_threshold=0.5)
    assert [r["kept"] for r in run_examples(strict, examples)] == [False] * 5
    kept = [r["kept"] for r in run_examples(loose, examples)]
    assert kept == [True, True, True, True, False]
    assert ("Predict", ["text"]) in seen[0] and len(seen[0]) in (2, 3)
    assert run_examples(loose, examples)[0]["calls"][0]["score"] == 0.75


def test_failures_become_records_without_the_secret(teacher_lm):
    def metric(example, prediction, trace):
        if "item 1" in example.text:
            raise ValueError("metric broke on sk-test-secret-123456")
        return True

    examples = [dspy.Example(text="boom 0", answer="x").with_inputs("text")] + two_step_examples(2)
    runner = TeacherRunner([TwoStep()], metric=metric, teacher_settings={"lm": teacher_lm},
                           secrets=["sk-test-secret-123456"])
    results = run_examples(runner, examples)
    assert results[0]["failure"]["stage"] == "program" and results[0]["failure"]["example_index"] == 0
    assert results[2]["failure"]["stage"] == "metric"
    assert results[2]["failure"]["error_type"] == "ValueError"
    assert "sk-test-secret-123456" not in json.dumps(results) and "***" in results[2]["failure"]["message"]
    assert "calls" in results[1]


def test_driver_settings_apply_in_the_runner(teacher_server, teacher_lm):
    class MarkedAdapter(dspy.ChatAdapter):
        def format_task_description(self, signature):
            return "MARKED. " + super().format_task_description(signature)

    runner = TeacherRunner([TwoStep()], settings={"lm": teacher_lm, "adapter": MarkedAdapter()})
    assert "calls" in run_examples(runner, two_step_examples(1))[0]
    assert "MARKED." in teacher_server.requests[-1][0]["content"]


@pytest.mark.parametrize("score, threshold, kept", [
    (True, None, True), (False, None, False), (0.0, None, False), (0.3, None, True),
    (0.3, 0.5, False), (0.5, 0.5, True), (1, 0.5, True), (None, None, True),
    (dspy.Prediction(score=0.9, feedback="ok"), 0.5, True),
])
def test_is_kept(score, threshold, kept):
    assert is_kept(score, threshold) is kept


def call(i, predictor, inputs, outputs, kept=True, call_index=0):
    return CallRecord(example_index=i, predictor=predictor, call_index=call_index, inputs=inputs,
                      outputs=outputs, score=1.0 if kept else 0.0, kept=kept)


def test_data_stage_uses_the_students_prompt_and_keeps_or_drops_duplicates(tmp_path):
    student = TwoStep()
    student.rewrite.demos = [dspy.Example(text="demo in", rewritten="demo out")]
    plan = check_program(student, [student], target="m", multitask=False, teacher_settings={"lm": object()})
    calls = [call(1, "rewrite", {"text": "b"}, {"rewritten": "b!"}),
             call(0, "rewrite", {"text": "a"}, {"rewritten": "a!"}),
             call(0, "answer.predict", {"rewritten": "a!"}, {"reasoning": "r", "answer": "A!"}, call_index=1),
             call(2, "rewrite", {"text": "a"}, {"rewritten": "a!"}),         # identical to example 0's
             call(3, "rewrite", {"text": "c"}, {"rewritten": "c!"}, kept=False)]
    kept_all = build_datasets(RunDir(tmp_path / "all"), calls, plan, student)  # as DSPy: every copy stays
    assert kept_all["rewrite"].records == 3 and kept_all["rewrite"].duplicates == 1
    assert kept_all["rewrite"].duplicates_dropped == 0
    run = RunDir(tmp_path / "run")
    summaries = build_datasets(run, calls, plan, student, drop_duplicates=True)
    rows = read_jsonl(run.data_file("rewrite"))
    assert [r["example_index"] for r in rows] == [0, 1]
    assert summaries["rewrite"].duplicates_dropped == 1 and summaries["rewrite"].records == 2
    assert "demo in" in json.dumps(rows[0]["messages"])  # the student's demos, as at inference
    assert rows[0]["messages"][-1]["role"] == "assistant" and "a!" in rows[0]["messages"][-1]["content"]
    assert [r["predictor"] for r in read_jsonl(run.data_file("answer.predict"))] == ["answer.predict"]

    excluded = build_datasets(RunDir(tmp_path / "run2"), calls, plan, student, exclude_demos=True)
    assert "demo in" not in (tmp_path / "run2" / "data" / "rewrite.jsonl").read_text()
    assert excluded["rewrite"].records == 3  # duplicates kept (the default)


def test_engines_are_chosen_by_aforward_and_give_the_same_records(teacher_lm):
    from bootfinetune.stages.runner import choose_engine, engine_of

    program = dspy.ChainOfThought("rewritten -> answer")  # has aforward: runs on the event loop with many slots
    assert engine_of(program) == "async" and engine_of(TwoStep()) == "threads"
    assert choose_engine(program, 64) == "async" and choose_engine(program, 8) == choose_engine(TwoStep(), 64) == "threads"
    examples = [dspy.Example(rewritten=f"item {i}!", answer=f"ITEM {i}!").with_inputs("rewritten") for i in range(6)]
    metric = lambda example, prediction, trace=None: prediction.answer == example.answer  # noqa: E731
    by_engine = {}
    for engine in ("async", "threads"):
        runner = TeacherRunner([program], metric=metric, teacher_settings={"lm": teacher_lm}, num_threads=3,
                               engine=engine)
        by_engine[engine] = run_examples(runner, examples)
    strip = lambda results: [(r["kept"], r["teacher_calls"], [(c["predictor"], c["inputs"], c["outputs"])  # noqa: E731
                                                              for c in r["calls"]]) for r in results]
    assert strip(by_engine["async"]) == strip(by_engine["threads"])
    assert all(r["kept"] and r["teacher_calls"] == 1 for r in by_engine["async"])
    assert by_engine["async"][0]["calls"][0]["predictor"] == "predict"


def test_a_slow_example_holds_only_its_own_slot():
    """Slots are per example and shared by every batch the actor holds: a slow example does not hold the
    others (no batch barrier), and never more than num_threads run at once."""
    import asyncio
    import threading
    import time

    running, peak, lock = [0], [0], threading.Lock()

    class Sleeper(dspy.Module):
        def forward(self, text):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(1.5 if text == "slow" else 0.2)
            with lock:
                running[0] -= 1
            return dspy.Prediction(answer=text)

    runner = TeacherRunner([Sleeper()], num_threads=2)
    batch = lambda texts: {"example_index": list(range(len(texts))),  # noqa: E731
                           "example": [example_to_json(dspy.Example(text=t).with_inputs("text")) for t in texts]}

    async def both():
        started, done = time.perf_counter(), {}

        async def timed(name, texts):
            out = await runner.run_batch(batch(texts))
            done[name] = time.perf_counter() - started
            return out

        outs = await asyncio.gather(timed("slow", ["slow"]), timed("fast", ["a", "b", "c", "d"]))
        return outs, done

    outs, done = asyncio.run(both())
    assert done["fast"] < 1.3 < done["slow"] < 2.2, done  # the fast batch ran beside the slow example
    assert peak[0] == 2
    assert [json.loads(r)["kept"] for r in outs[1]["result"]] == [True] * 4


def test_teacher_tokens_and_cost_per_model_as_dspy_reports_them(teacher_server):
    """Tokens and cost by model, per example; a model DSPy has no price for costs None (unknown), not 0;
    a cache hit is not a teacher call."""
    priced = dspy.LM("openai/gpt-4o-mini", api_base=teacher_server.url, api_key="unused", cache=False)
    model = f"openai/unpriced-{uuid.uuid4().hex[:8]}"  # fresh in DSPy's on-disk cache, unknown to its price list
    unpriced = dspy.LM(model, api_base=teacher_server.url, api_key="unused", cache=True)
    examples = two_step_examples(2, offset=501)  # three calls each
    first = run_examples(TeacherRunner([TwoStep()], metric=two_step_metric, teacher_settings={"lm": priced}), examples)
    usage = first[0]["usage"]["openai/gpt-4o-mini"]
    assert usage["calls"] == first[0]["teacher_calls"] == 3
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0 and usage["cost_usd"] > 0
    runner = TeacherRunner([TwoStep()], metric=two_step_metric, teacher_settings={"lm": unpriced})
    fresh, cached = run_examples(runner, examples), run_examples(runner, examples)
    assert fresh[0]["usage"][model]["cost_usd"] is None
    assert fresh[0]["teacher_calls"] == 3 and cached[0]["teacher_calls"] == 0 and cached[0]["usage"] == {}


def test_actors_get_the_teacher_lms_without_their_history(teacher_server):
    """A teacher LM that already answered many calls in the driver keeps that history there; the copy each
    actor unpickles carries none of it, and the runner built from the packed arguments still works."""
    import asyncio

    import ray.cloudpickle

    from bootfinetune.config import DEFAULT_TEACHER_TIMEOUT
    from bootfinetune.stages.runner import StreamingTeacherRunner, pack_for_actors

    teacher = dspy.LM("openai/scripted-teacher", api_base=teacher_server.url, api_key="unused", cache=False)
    program = TwoStep()
    program.answer.set_lm(teacher)  # the same LM in a predictor and in the settings: it stays one object
    examples = two_step_examples(3)
    run_examples(TeacherRunner([program], metric=two_step_metric, teacher_settings={"lm": teacher}), examples)
    history = list(teacher.history)
    assert len(history) == 9
    kwargs = dict(teachers=[program], metric=two_step_metric, teacher_settings={"lm": teacher}, num_threads=2)
    packed = pack_for_actors(kwargs)
    assert set(packed) == {"packed", "num_threads"}
    assert len(packed["packed"]) < len(ray.cloudpickle.dumps(kwargs)) / 2
    runner = StreamingTeacherRunner(**packed)
    lm = runner.context["lm"]
    assert lm is not teacher and lm.history == [] and runner.teachers[0].answer.predict.lm is lm
    assert (lm.model, lm.kwargs) == (teacher.model, {**teacher.kwargs, "timeout": DEFAULT_TEACHER_TIMEOUT})
    assert teacher.history == history  # the user's LM is untouched
    batch = {"example_index": [0, 1, 2], "example": [example_to_json(e) for e in examples]}
    results = [json.loads(r) for r in asyncio.run(runner(batch))["result"]]
    assert [r["kept"] for r in results] == [True, True, True] and len(lm.history) == 9
