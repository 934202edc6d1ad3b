"""DSPy's adapters and dspy.configure settings on a local Ray cluster: teacher, records and compiled program agree."""

import json
from pathlib import Path

import dspy
import pytest
from dspy.utils.callback import BaseCallback
from dspy.utils.exceptions import AdapterParseError

import bootfinetune
from bootfinetune import BootstrapFinetune
from bootfinetune.stages.adapters import adapter_of
from bootfinetune.run.jsonio import read_json, read_jsonl
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.programs import RAG, TwoStep, color_rm, rag_examples, rag_script, two_step_examples

pytestmark = pytest.mark.integration

# What each adapter asks for at the end of its prompt.
ASKS = {"JSONAdapter": "Respond with a JSON object", "XMLAdapter": "wrapped in XML tags"}


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory):
    return str(build_tiny_causal(tmp_path_factory.mktemp("models") / "tiny-llama"))


def first_call_messages(program, lm, **inputs):
    """The messages of the first LM call `program(**inputs)` makes (the tiny model's answer may not parse)."""
    before = len(lm.history)
    try:
        program(**inputs)
    except AdapterParseError:
        pass  # a tiny model writes the format only roughly; the prompt is what is checked
    assert len(lm.history) > before, "the finetuned LM was not called"
    return lm.history[before]["messages"]


@pytest.mark.parametrize("adapter_cls", [dspy.JSONAdapter, dspy.XMLAdapter], ids=lambda c: c.__name__)
def test_compile_with_json_and_xml_adapters(ray_cluster, tiny_causal, tmp_path, adapter_cls):
    asks = ASKS[adapter_cls.__name__]
    with TeacherServer(rag_script) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="sk-adapter-test", cache=False)
        with dspy.context(rm=color_rm):
            # DSPy 3.x shapes: multitask by keyword, train_kwargs with TRL names, compile(student, trainset);
            # DSPy 2.4's path_prefix places the run, and compile's epochs=1 wins over the constructor's 3.
            tp = BootstrapFinetune(teacher_settings={"lm": teacher}, multitask=True, adapter=adapter_cls(),
                                   train_kwargs={"learning_rate": 1e-3, "per_device_train_batch_size": 3},
                                   epochs=3, storage_path=str(tmp_path / "elsewhere"), num_actors=1, max_tokens=16)
            compiled = tp.compile(RAG(), rag_examples(6), target=tiny_causal, epochs=1, int8=False,
                                  path_prefix=str(tmp_path / "runs"))
        assert server.calls == 6  # the teacher answered each prompt in the adapter's format: no retries
        assert all(asks in request[-1]["content"] for request in server.requests)
    run = tp.run_dir
    config = read_json(run.config_json)
    assert config["adapter"]["class"].endswith(f":{adapter_cls.__name__}")
    assert (config["options"]["train"]["lr"], config["options"]["train"]["bsize"]) == (1e-3, 3)  # not compile's
    assert config["options"]["train"]["epochs"] == 1 and len(read_json(run.manifest_json("all"))["history"]) == 1
    assert run.root.parent == tmp_path / "runs" and not (tmp_path / "elsewhere").exists()

    signature = RAG().generate_answer.predict.signature
    rows = read_jsonl(run.data_file("all"))
    assert len(rows) == 6
    for i, row in enumerate(rows):
        assert asks in row["messages"][-2]["content"]
        context = color_rm(f"What color is thing{i}?")[0].long_text
        assert adapter_cls().parse(signature, row["messages"][-1]["content"]) == rag_script({"context": context}, [])

    # At inference, with nothing configured, the compiled program writes its prompts with that adapter;
    # so does the program rebuilt from the run directory in this process.
    predictor = compiled.generate_answer.predict
    assert dspy.settings.adapter is None and type(adapter_of(predictor)) is adapter_cls
    with dspy.context(rm=color_rm):
        messages = first_call_messages(compiled, predictor.lm, question="What color is thing40?")
        assert asks in messages[-1]["content"] and "thing40" in messages[-1]["content"]
        loaded = bootfinetune.load(run.root)
        loaded_lm = loaded.generate_answer.predict.lm
        assert Path(bootfinetune.finetuned_engine(loaded_lm).model) == run.model_dir("all")
        assert asks in first_call_messages(loaded, loaded_lm, question="What color is thing41?")[-1]["content"]


class FileCallback(BaseCallback):
    """Appends one line per LM call to a file: the driver reads what the actors' calls did."""

    def __init__(self, path):
        self.path = str(path)

    def on_lm_start(self, call_id, instance, inputs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"model": instance.model}) + "\n")


def usage_metric(example, prediction, trace=None):
    """Keeps a trace only when track_usage gave the prediction its LM usage (inside the actor)."""
    usage = prediction.get_lm_usage() or {}
    return bool(usage) and all(u.get("prompt_tokens", 0) > 0 for u in usage.values())


def test_configured_callbacks_and_track_usage_hold_inside_the_actors(ray_cluster, tiny_causal, teacher_server,
                                                                     teacher_lm, tmp_path):
    log = tmp_path / "lm_calls.jsonl"
    dspy.configure(callbacks=[FileCallback(log)], track_usage=True)
    try:
        tp = BootstrapFinetune(metric=usage_metric, teacher_settings={"lm": teacher_lm},
                               storage_path=str(tmp_path / "runs"), num_actors=2, batch_size=2)
        prepared = tp.prepare(TwoStep(), trainset=two_step_examples(4), target=tiny_causal)
    finally:
        dspy.configure(callbacks=[], track_usage=False)
    summary = prepared.bootstrap.summary
    lines = log.read_text().splitlines()
    assert len(lines) == summary.teacher_calls == teacher_server.calls > 0  # every actor-side call was seen
    assert {json.loads(line)["model"] for line in lines} == {"openai/scripted-teacher"}
    assert summary.kept == summary.examples == 4  # usage reached every prediction in the actors
