"""Every DSPy adapter: training records, the scripted teacher's answers, and the compiled program's prompts (no Ray)."""

import asyncio
import copy
import json

import cloudpickle
import dspy
import pytest

from bootfinetune.stages.adapters import (adapter_from_spec, adapter_of, adapter_option, adapter_spec, answer_problem,
                                   finetune_messages, scope_adapter)
from bootfinetune.stages.checks import check_program
from bootfinetune.stages.datasets import build_datasets
from bootfinetune.errors import ConfigError, ProgramError
from bootfinetune.run.jsonio import read_jsonl
from bootfinetune.run.records import CallRecord
from bootfinetune.run.rundir import RunDir
from bootfinetune.testing.teacher_server import TeacherServer, answer_format, parse_chat_request
from tests.programs import TwoStep, two_step_script

ADAPTERS = [dspy.ChatAdapter, dspy.JSONAdapter, dspy.XMLAdapter]
# What each adapter asks for in its prompt, and how its answer starts.
PROMPT_MARK = {"ChatAdapter": "[[ ## completed ## ]]", "JSONAdapter": "Respond with a JSON object",
               "XMLAdapter": "wrapped in XML tags"}
ANSWER_START = {"ChatAdapter": "[[ ## reasoning ## ]]", "JSONAdapter": "{", "XMLAdapter": "<reasoning>"}
COT = dspy.ChainOfThought("context, question -> answer").predict.signature
# Newlines, quotes, braces and the characters XML reserves: each adapter must escape what its format needs.
HARD_OUTPUTS = {"reasoning": 'a < b & "c" {d}\nsecond line', "answer": "gold"}


@pytest.mark.parametrize("adapter_cls", ADAPTERS, ids=lambda c: c.__name__)
def test_records_are_the_adapters_own_format_and_parse_back(adapter_cls):
    adapter = adapter_cls()
    demos = [dspy.Example(context="c0", question="q0", reasoning="r0", answer="a0")]
    messages = finetune_messages(adapter, COT, demos, {"context": "thing1 is gold.", "question": "Color?"},
                                 HARD_OUTPUTS)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    name = adapter_cls.__name__
    assert PROMPT_MARK[name] in messages[-2]["content"] or PROMPT_MARK[name] in messages[0]["content"]
    assert messages[-1]["content"].lstrip().startswith(ANSWER_START[name])
    assert messages[:-1] == adapter.format(COT, demos, {"context": "thing1 is gold.", "question": "Color?"})
    assert adapter.parse(COT, messages[-1]["content"]) == HARD_OUTPUTS
    assert answer_problem(adapter, COT, messages[-1]["content"], HARD_OUTPUTS) is None


def test_json_records_come_from_the_adapters_formatting_where_dspy_has_none():
    adapter = dspy.JSONAdapter()
    messages = finetune_messages(adapter, COT, [], {"context": "x", "question": "y"}, HARD_OUTPUTS)
    assert json.loads(messages[-1]["content"]) == HARD_OUTPUTS
    assert "Outputs will be a JSON object" in messages[0]["content"]


def test_answer_problem_names_the_field_that_does_not_come_back():
    adapter = dspy.ChatAdapter()
    written = adapter.format_assistant_message_content(COT, {"reasoning": "r", "answer": "blue"})
    problem = answer_problem(adapter, COT, written, {"reasoning": "r", "answer": "red"})
    assert "'answer'" in problem and '"blue"' in problem
    assert "cannot parse" in answer_problem(dspy.JSONAdapter(), COT, "no json here", {"answer": "red"})


@pytest.mark.parametrize("adapter_cls", ADAPTERS, ids=lambda c: c.__name__)
def test_data_stage_writes_each_adapters_records(adapter_cls, tmp_path):
    student = TwoStep()
    plan = check_program(student, [student], target="m", multitask=True, teacher_settings={"lm": object()})
    calls = [CallRecord(example_index=0, predictor="rewrite", call_index=0, inputs={"text": "a <b>"},
                        outputs={"rewritten": "a <b>!"}, score=1.0, kept=True),
             CallRecord(example_index=0, predictor="answer.predict", call_index=1, inputs={"rewritten": "a <b>!"},
                        outputs=HARD_OUTPUTS, score=1.0, kept=True)]
    run = RunDir(tmp_path / "run")
    summary = build_datasets(run, calls, plan, student, adapter=adapter_cls())["all"]
    assert (summary.records, summary.unformattable, summary.unparseable) == (2, 0, 0)
    rows = read_jsonl(run.data_file("all"))
    predictors = dict(student.named_predictors())
    for row, call in zip(rows, calls):
        answer = row["messages"][-1]["content"]
        assert adapter_cls().parse(predictors[call.predictor].signature, answer) == call.outputs


def test_data_stage_drops_and_counts_answers_the_adapter_cannot_read_back(tmp_path):
    class LossyAdapter(dspy.ChatAdapter):  # writes every answer upper-cased: it no longer parses to the outputs
        def format_assistant_message_content(self, signature, outputs, missing_field_message=None):
            upper = {k: str(v).upper() for k, v in outputs.items()}
            return super().format_assistant_message_content(signature, upper, missing_field_message)

        def format_finetune_data(self, signature, demos, inputs, outputs):
            raise NotImplementedError

    student = TwoStep()
    plan = check_program(student, [student], target="m", multitask=True, teacher_settings={"lm": object()})
    calls = [CallRecord(example_index=0, predictor="rewrite", call_index=0, inputs={"text": "a"},
                        outputs={"rewritten": "a!"}, score=1.0, kept=True),
             CallRecord(example_index=1, predictor="rewrite", call_index=0, inputs={"text": "B"},
                        outputs={"rewritten": "B!"}, score=1.0, kept=True)]
    summary = build_datasets(RunDir(tmp_path / "run"), calls, plan, student, adapter=LossyAdapter())["all"]
    assert (summary.records, summary.unparseable) == (1, 1)  # "B!" survives upper-casing, "a!" does not


@pytest.mark.parametrize("adapter_cls", ADAPTERS, ids=lambda c: c.__name__)
def test_scripted_teacher_answers_in_the_format_it_was_asked_in(adapter_cls):
    adapter = adapter_cls()
    messages = adapter.format(COT, [], {"context": ["thing1 is <gold> & {x}", "p2"], "question": "What\ncolor?"})
    inputs, outputs = parse_chat_request(messages)
    assert inputs == {"context": "[1] «thing1 is <gold> & {x}»\n[2] «p2»", "question": "What\ncolor?"}
    assert outputs == ["reasoning", "answer"]
    assert answer_format(messages) == {"ChatAdapter": "chat", "JSONAdapter": "json", "XMLAdapter": "xml"}[
        adapter_cls.__name__]

    def script(inputs, outputs):
        return {"reasoning": f"read <{inputs['rewritten']}> & more\nline 2", "answer": inputs["rewritten"].upper()}

    with TeacherServer(script) as server:
        lm = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="unused", cache=False, num_retries=0)
        predict = dspy.ChainOfThought("rewritten -> answer")
        with dspy.context(lm=lm, adapter=adapter):
            prediction = predict(rewritten="x {y}")
        assert server.calls == 1  # answered in the adapter's format on the first try: no fallback call
    assert prediction.answer == "X {Y}" and prediction.reasoning == "read <x {y}> & more\nline 2"


def test_compiled_predictors_keep_their_adapter_through_copies_pickles_and_contexts():
    with TeacherServer(two_step_script) as server:
        lm = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="unused", cache=False, num_retries=0)
        program = TwoStep()
        program.set_lm(lm)
        scope_adapter(program, dspy.JSONAdapter())
        copies = [program, copy.deepcopy(program), program.deepcopy(), cloudpickle.loads(cloudpickle.dumps(program))]
        for i, p in enumerate(copies):
            assert type(adapter_of(p.rewrite)).__name__ == "JSONAdapter"
            with dspy.context(adapter=dspy.XMLAdapter()):  # the caller's setting does not change a trained format
                prediction = p(text=f"item {i}")
                rewritten = asyncio.run(p.rewrite.acall(text=f"async {i}")).rewritten
            assert prediction.answer == f"ITEM {i}!!" and rewritten == f"async {i}!"
            assert all("Respond with a JSON object" in m[-1]["content"] for m in list(server.requests)[-4:])
        unscoped = TwoStep()
        unscoped.set_lm(lm)
        with dspy.context(adapter=dspy.XMLAdapter()):  # without the scope, the setting decides
            assert unscoped(text="item 9").answer == "ITEM 9!!"
        assert "wrapped in XML tags" in server.requests[-1][-1]["content"]
    assert adapter_of(unscoped.rewrite) is None


def test_adapter_spec_round_trips_and_options_are_checked():
    restored = adapter_from_spec(adapter_spec(dspy.ChatAdapter(use_json_adapter_fallback=False)))
    assert type(restored) is dspy.ChatAdapter and restored.use_json_adapter_fallback is False
    assert type(adapter_from_spec(adapter_spec(dspy.XMLAdapter()))) is dspy.XMLAdapter
    assert adapter_from_spec(None) is None
    two_step = adapter_spec(dspy.TwoStepAdapter(dspy.LM("openai/extractor", api_key="x")))  # needs an LM to rebuild
    with pytest.raises(ProgramError, match=r"cannot be rebuilt from config.json's options.*pass adapter="):
        adapter_from_spec(two_step)
    lm_a, lm_b = dspy.LM("openai/a", api_key="x"), dspy.LM("openai/b", api_key="x")
    assert type(adapter_option({lm_a: dspy.JSONAdapter(), lm_b: dspy.JSONAdapter()})) is dspy.JSONAdapter
    with pytest.raises(ConfigError, match="different adapters per LM"):
        adapter_option({lm_a: dspy.JSONAdapter(), lm_b: dspy.XMLAdapter()})
    with pytest.raises(ConfigError, match=r"pass an instance, adapter=dspy.JSONAdapter\(\)"):
        adapter_option(dspy.JSONAdapter)
    with pytest.raises(ConfigError, match="lacks format"):
        adapter_option("json")


def test_a_program_bound_to_served_models_formats_with_the_recorded_adapter():
    from bootfinetune.stages.rebind import rebind_served
    from bootfinetune.run.runfiles import RunDescription

    # config.json as a compile with XMLAdapter writes it; the scripted teacher stands in for `bootfinetune serve`.
    described = RunDescription.from_json({"model_keys": {"all": {"target": "m", "predictors": ["rewrite", "answer.predict"]}},
                                          "adapter": adapter_spec(dspy.XMLAdapter())})
    with TeacherServer(two_step_script) as server:
        served = rebind_served(TwoStep(), described, server.url, max_tokens=64)
        assert served(text="item 3").answer == "ITEM 3!!"
        assert server.calls == 3 and all("wrapped in XML tags" in m[-1]["content"] for m in server.requests)
        as_json = rebind_served(TwoStep(), described, server.url, adapter=dspy.JSONAdapter())
        assert as_json(text="item 4").answer == "ITEM 4!!"
        assert "Respond with a JSON object" in server.requests[-1][-1]["content"]
