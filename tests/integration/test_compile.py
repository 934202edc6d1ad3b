"""compile() end to end on a local Ray cluster: bootstrap, finetune, rebind, evaluate, save and load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from bootfinetune import BootstrapFinetune
from bootfinetune.run.jsonio import read_json, read_jsonl
from bootfinetune.serving.lm import finetuned_engine
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_causal, build_tiny_t5
from tests.programs import RAG, TwoStep, color_rm, rag_examples, rag_script, two_step_examples, two_step_metric

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return str(build_tiny_t5(tmp_path_factory.mktemp("models") / "tiny-t5"))


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory):
    return str(build_tiny_causal(tmp_path_factory.mktemp("models") / "tiny-llama"))


def greedy_outputs(program, inputs_list):
    """What the program answers, or the raw completion when the tiny model's text does not parse."""
    outputs = []
    for inputs in inputs_list:
        try:
            outputs.append({k: str(v) for k, v in program(**inputs).items()})
        except AdapterParseError as exc:
            outputs.append({"unparsed": exc.lm_response})
    return outputs


def test_documented_example(ray_cluster, tiny_t5, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTFINETUNE_STORAGE", str(tmp_path / "runs"))
    with TeacherServer(rag_script) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="sk-doc-example-key",
                          cache=False)
        trainset = rag_examples(24)
        with dspy.context(rm=color_rm):  # the user's dspy.configure(rm=...)
            student = RAG()
            # -- as documented --
            teleprompter = BootstrapFinetune(teacher_settings=dict({'lm': teacher}))
            compiled = teleprompter.compile(student=student, trainset=trainset, target=tiny_t5)
            # -------------------
            history_before = len(compiled.generate_answer.predict.lm.history)
            answer = greedy_outputs(compiled, [{"question": "What color is thing70?"}])[0]
        assert server.calls == 24  # one chain-of-thought call per example
    assert compiled is not student and student.generate_answer.predict.lm is None
    lm = compiled.generate_answer.predict.lm
    assert isinstance(lm, dspy.LM) and Path(finetuned_engine(lm).model) == teleprompter.run_dir.model_dir("all")
    assert len(lm.history) == history_before + 1 or "unparsed" in answer  # the finetuned model answered
    assert answer.get("answer") or answer.get("unparsed")
    run = teleprompter.run_dir
    assert run.root.parent == tmp_path / "runs"
    for name in ("config.json", "report.json", "program.json", "data/all.jsonl", "models/all/manifest.json",
                 "models/all/model.safetensors", "models/all/config.json", "models/all/tokenizer.json"):
        assert (run.root / name).exists(), name
    report = read_json(run.report_json)
    assert report["stages"]["bootstrap"]["kept"] == 24 and report["stages"]["bootstrap"]["teacher_calls"] == 24
    assert report["stages"]["finetune"]["all"]["best_epoch"] == 1
    assert report["stages"]["finetune"]["all"]["tokens"] > 0
    assert set(report["metric"]) >= {"before", "after", "teacher"}
    for path in run.root.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            assert "sk-doc-example-key" not in path.read_text(), path


@pytest.fixture(scope="module")
def per_predictor_compile(ray_cluster, tiny_t5, tiny_causal, tmp_path_factory):
    """multitask=False, `rewrite` (called twice per example) on a causal LM, `answer` on a T5."""
    storage = tmp_path_factory.mktemp("runs")
    with TeacherServer(__import__("tests.programs", fromlist=["two_step_script"]).two_step_script) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="sk-unused-123", cache=False)
        tp = BootstrapFinetune(metric=two_step_metric, teacher_settings={"lm": teacher}, multitask=False,
                               storage_path=str(storage), max_tokens=32)
        student = TwoStep()
        compiled = tp.compile(student, trainset=two_step_examples(24), valset=two_step_examples(8, offset=500),
                              target={"rewrite": tiny_causal, "answer.predict": tiny_t5},
                              epochs=2, bsize=8, lr=3e-3)
    return tp, student, compiled


def test_per_predictor_models_hold_only_their_own_calls(per_predictor_compile):
    tp, student, compiled = per_predictor_compile
    run = tp.run_dir
    rewrite_rows = read_jsonl(run.data_file("rewrite"))
    answer_rows = read_jsonl(run.data_file("answer.predict"))
    assert {r["predictor"] for r in rewrite_rows} == {"rewrite"}
    assert {r["predictor"] for r in answer_rows} == {"answer.predict"}
    # 24 examples: 3 take the branch and 4 get wrong answers; rewrite runs twice per kept example.
    assert len(rewrite_rows) == 2 * len({r["example_index"] for r in rewrite_rows}) == 2 * 20
    assert len(answer_rows) == 20 - 3
    manifests = {k: read_json(run.model_dir(k) / "manifest.json") for k in ("rewrite", "answer.predict")}
    assert manifests["rewrite"]["predictors"] == ["rewrite"] and manifests["rewrite"]["model_kind"] == "causal"
    assert manifests["answer.predict"]["predictors"] == ["answer.predict"]
    assert manifests["answer.predict"]["model_kind"] == "seq2seq"
    assert compiled.rewrite.lm is not compiled.answer.predict.lm
    assert Path(finetuned_engine(compiled.rewrite.lm).model).name == "rewrite"
    assert student.rewrite.lm is None and not getattr(student, "_compiled", False)
    report = read_json(run.report_json)
    assert report["metric"]["teacher"] == pytest.approx(7 / 8)  # valset example 504 gets a wrong teacher answer
    assert report["metric"]["before"] is not None and report["metric"]["after"] is not None
    losses = report["stages"]["finetune"]["rewrite"]["train_loss"]
    assert len(losses) == 2 and losses[1] < losses[0]


LOAD_SCRIPT = r"""
import json, sys
import dspy
import bootfinetune
from bootfinetune.serving.lm import finetuned_engine
from tests.programs import TwoStep
from tests.integration.test_compile import greedy_outputs
saved, inputs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for kind, path in saved.items():
    if kind == "pickle":
        program = dspy.load(path, allow_pickle=True)
    elif kind == "json":
        program = TwoStep()
        program.load(path, allow_unsafe_lm_state=True)
    else:
        program = bootfinetune.load(path)
    assert type(program.rewrite.lm) is dspy.LM and finetuned_engine(program.rewrite.lm), program.rewrite.lm
    print(f"OUTPUTS {kind}=" + json.dumps(greedy_outputs(program, inputs)))
"""


def test_save_and_load_in_a_new_process_give_identical_outputs(per_predictor_compile, tmp_path):
    tp, _, compiled = per_predictor_compile
    inputs = [{"text": "item 901"}, {"text": "skip item 902"}, {"text": "item 77"}]
    expected = greedy_outputs(compiled, inputs)
    compiled.save(str(tmp_path / "pickled"), save_program=True)
    with pytest.raises(Exception, match="allow_pickle"):  # a pickled program needs DSPy's explicit flag
        dspy.load(str(tmp_path / "pickled"))
    compiled.save(str(tmp_path / "state.json"))
    paths = {"run_dir": str(tp.run_dir.root), "json": str(tmp_path / "state.json"), "pickle": str(tmp_path / "pickled")}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # One new process, which never compiled, loads the three forms in turn (each process costs seconds of imports).
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(paths), json.dumps(inputs)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for kind in paths:
        line = [l for l in out.stdout.splitlines() if l.startswith(f"OUTPUTS {kind}=")][-1]
        assert json.loads(line.split("=", 1)[1]) == expected, kind
