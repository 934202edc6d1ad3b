"""MLflow end to end on a real local store: autolog records our compile, we add the metric before/after,
and each model key trained gets a run (nested under the compile's) that rank 0 of Ray Train logs into.

One compile serves every assertion (see tests/unit/test_tracking.py for the pieces)."""

import json

import dspy
import pytest

from bootfinetune import BootstrapFinetune
from bootfinetune.run.jsonio import read_json
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_t5
from tests.programs import TwoStep, two_step_examples, two_step_metric, two_step_script

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tracked_compile(ray_cluster, tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("tracking")
    uri = (root / "mlruns").as_uri()
    target = str(build_tiny_t5(root / "tiny-t5"))
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's opt-in to its file store; rank 0 gets it from the driver
    mlflow.set_tracking_uri(uri)
    mlflow.dspy.autolog(log_compiles=True)
    usage = dspy.settings.track_usage
    try:
        with TeacherServer(two_step_script) as server:
            teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="sk-tracking-secret-99",
                              cache=False)
            tp = BootstrapFinetune(metric=two_step_metric, teacher_settings={"lm": teacher},
                                   storage_path=str(root / "runs"), max_tokens=16, num_actors=1)
            compiled = tp.compile(TwoStep(), trainset=two_step_examples(12), valset=two_step_examples(4, offset=500),
                                  target=target, epochs=2, bsize=8, lr=3e-3, mlflow_tracking_uri=uri)
    finally:
        mlflow.dspy.autolog(disable=True)
        dspy.settings.configure(track_usage=usage)
        mlflow.set_tracking_uri(None)
        mp.undo()
    return tp, compiled, mlflow.MlflowClient(uri), root


def test_autolog_records_our_compile_and_we_add_the_metric_before_and_after(tracked_compile, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tp, compiled, client, root = tracked_compile
    runs = client.search_runs(["0"])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1 and top[0].info.status == "FINISHED"
    compile_run = top[0]
    params, metrics = compile_run.data.params, compile_run.data.metrics
    assert params["epochs"] == "2" and params["bsize"] == "8"  # autolog: compile's scalar arguments
    report = read_json(tp.run_dir.report_json)
    assert metrics["metric_before"] == report["metric"]["before"]
    assert metrics["metric_after"] == report["metric"]["after"]
    assert metrics["metric_teacher"] == report["metric"]["teacher"]
    assert metrics["teacher_calls"] == report["stages"]["bootstrap"]["teacher_calls"] + \
        report["stages"]["bootstrap"]["val"]["teacher_calls"] > 0
    assert metrics["teacher_prompt_tokens"] > 0  # autolog turns DSPy's usage tracking on; the actors record it
    assert compile_run.data.tags["bootfinetune.run_dir"] == str(tp.run_dir.root)
    # autolog saved our compiled program (its finetuned LMs' state included) as the run's best_model.json
    best = client.download_artifacts(compile_run.info.run_id, "best_model.json", str(root))
    state = json.loads(open(best).read())
    assert state["rewrite"]["lm"]["model"] == compiled.rewrite.lm.model
    assert "sk-tracking-secret-99" not in open(best).read()


def test_each_model_key_gets_a_nested_run_with_step_loss_and_eval_loss_per_epoch(tracked_compile, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tp, _, client, _ = tracked_compile
    runs = client.search_runs(["0"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [r.data.tags["bootfinetune.model_key"] for r in children] == ["all"]
    run = children[0]
    assert run.info.status == "FINISHED" and run.data.tags["bootfinetune.run_dir"] == str(tp.run_dir.root)
    assert run.data.params["lr"] == "0.003" and run.data.params["epochs"] == "2"
    manifest = read_json(tp.run_dir.model_dir("all") / "manifest.json")

    def history(name):
        return [(m.step, round(m.value, 4)) for m in
                sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]

    assert [s for s, _ in history("eval_loss")] == [0, 1, 2]  # step 0: before training
    assert [v for _, v in history("eval_loss")[1:]] == [round(x, 4) for x in manifest["losses"]["eval"]]
    assert [v for _, v in history("train_loss")] == [round(x, 4) for x in manifest["losses"]["train"]]
    assert len(history("train_loss_step")) >= 2
