"""MLflow tracking's pieces on a real local MLflow store (file:// on disk), without Ray.

The compile end to end (autolog's run, the metric before/after, a run per model key from rank 0)
is in tests/integration/test_tracking.py.
"""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import dspy
import pytest

from bootfinetune import BootstrapFinetune
from bootfinetune.errors import ConfigError
from bootfinetune.run.runfiles import RunDescription
from bootfinetune.stages.bootstrap import driver_settings
from bootfinetune.training import tracking
from bootfinetune.training.train_loop import LoopState

SECRET = "tok-sekrit-4242"


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's opt-in to its file store (no database here)
    uri = (tmp_path / "mlruns").as_uri()
    yield uri, mlflow.MlflowClient(uri)


@pytest.fixture
def no_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def without_mlflow(monkeypatch, no_env):
    """mlflow not installed: `import mlflow` raises ImportError, as it does where the extra is missing."""
    monkeypatch.setitem(sys.modules, "mlflow", None)


def test_the_option_comes_first_then_the_environment(monkeypatch, no_env, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    assert tracking.resolve_uri("file:///opt/mlruns") == ("file:///opt/mlruns", "mlflow_tracking_uri")
    assert tracking.resolve_uri(None)[0] == "http://env-host:5000"
    monkeypatch.chdir(tmp_path)  # a relative store is made absolute: the workers run in other folders
    assert tracking.resolve_uri("mlruns")[0] == (tmp_path / "mlruns").as_uri()
    assert tracking.resolve_uri("sqlite:///m.db")[0] == f"sqlite:///{tmp_path}/m.db"


def test_without_mlflow_and_without_a_uri_nothing_changes(without_mlflow):
    assert tracking.resolve_uri(None) == (None, "")
    assert tracking.problems(None) == []
    assert tracking.training_runs(None, "/runs/x") is None
    tracking.log_compile_result("/runs/x", {"metric": {"before": 0.5}})  # no active run anywhere: nothing


def test_a_uri_without_mlflow_stops_the_compile_before_any_work(without_mlflow, monkeypatch):
    tp = BootstrapFinetune(mlflow_tracking_uri=f"https://user:{SECRET}@mlflow.example:443")
    with pytest.raises(ConfigError) as err:
        tp.compile(dspy.Predict("q -> a"), trainset=[dspy.Example(q="x", a="y").with_inputs("q")])
    message = str(err.value)
    assert "mlflow_tracking_uri=" in message and "pip install 'bootfinetune[mlflow]'" in message
    assert SECRET not in message and "https://***@mlflow.example:443" in message
    assert tp.run_dir is None  # stopped before the run directory was chosen
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    problem = tracking.problems(None)[0]
    assert "$MLFLOW_TRACKING_URI" in problem and "unset MLFLOW_TRACKING_URI" in problem


def test_config_json_records_the_uri_redacted_and_never_reuses_it():
    uri = f"https://user:{SECRET}@mlflow.example/api"
    described = RunDescription(options={"run": {"mlflow_tracking_uri": uri, "run_name": "r"}})
    written = json.dumps(described.to_json())
    assert SECRET not in written and "https://***@mlflow.example/api" in written
    assert described.options["run"]["mlflow_tracking_uri"] == uri  # the record itself is left as given
    assert described.flat_options() == {"run_name": "r"}


def test_compile_results_go_into_the_active_run(store):
    import mlflow

    uri, client = store
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as active:
            tracking.log_compile_result("s3://***@bucket/runs/r1", {
                "metric": {"before": 0.25, "after": 0.75, "teacher": None},
                "stages": {"bootstrap": {"teacher_calls": 12, "usage": {"openai/t": {
                    "prompt_tokens": 300, "completion_tokens": 40, "cost_usd": None}},
                    "val": {"teacher_calls": 4, "usage": {"openai/t": {"prompt_tokens": 100, "completion_tokens": 9,
                                                                        "cost_usd": None}}}}}})
    finally:
        mlflow.set_tracking_uri(None)
    data = client.get_run(active.info.run_id).data
    assert data.metrics == {"metric_before": 0.25, "metric_after": 0.75, "teacher_calls": 16.0,
                            "teacher_prompt_tokens": 400.0, "teacher_completion_tokens": 49.0}
    assert data.tags["bootfinetune.run_dir"] == "s3://***@bucket/runs/r1"


def test_training_run_nests_under_the_active_run_and_rank0_logs_into_it(store, no_env):
    import mlflow

    from bootfinetune.config import TrainConfig

    uri, client = store
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as parent:
            runs = tracking.training_runs(None, "/runs/r1")  # MLflow's own URI: the active run's
            spec = runs.start("all", "/models/tiny", TrainConfig(epochs=2, lr=1e-3))
    finally:
        mlflow.set_tracking_uri(None)
    run = client.get_run(spec["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.info.experiment_id == parent.info.experiment_id
    assert run.data.tags["bootfinetune.model_key"] == "all" and run.data.tags["bootfinetune.run_dir"] == "/runs/r1"
    assert run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.001"
    assert run.data.params["target"] == "/models/tiny"

    state = LoopState()
    tracker = tracking.open_tracker(spec, state, rank=0)  # opened before the loss before training, as the loop does
    assert tracking.open_tracker(spec, state, rank=1) is None
    state.eval_loss_before = 3.0
    state.loss_curve += [[1, 2.5], [2, 2.0]]
    tracker.update(state)
    state.history.append({"epoch": 1, "train_loss": 2.2, "eval_loss": 2.1, "tokens_per_second": 10.0})
    tracker.update(state, force=True)
    # A restarted worker group resumes from epoch 1's checkpoint: only what comes after is logged.
    resumed = LoopState(**{**state.__dict__, "loss_curve": list(state.loss_curve), "history": list(state.history)})
    again = tracking.open_tracker(spec, resumed, rank=0)
    resumed.loss_curve.append([3, 1.5])
    resumed.history.append({"epoch": 2, "train_loss": 1.6, "eval_loss": 1.7, "tokens_per_second": 12.0})
    again.update(resumed, force=True)
    runs.end("all", ok=True)

    def history(name):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(spec["run_id"], name),
                                                  key=lambda m: m.step)]

    assert history("train_loss_step") == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert history("eval_loss") == [(0, 3.0), (1, 2.1), (2, 1.7)]
    assert history("train_loss") == [(1, 2.2), (2, 1.6)]
    assert client.get_run(spec["run_id"]).info.status == "FINISHED"


def test_an_unreachable_server_leaves_training_untracked_and_its_credentials_unsaid(monkeypatch, no_env, caplog):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    caplog.set_level(logging.INFO, logger="bootfinetune")
    from bootfinetune.config import TrainConfig

    runs = tracking.training_runs(f"http://user:{SECRET}@127.0.0.1:{port}", "/runs/r1")
    assert runs.start("all", "/models/tiny", TrainConfig()) is None
    assert "trains untracked" in caplog.text and f"http://***@127.0.0.1:{port}" in caplog.text
    assert SECRET not in caplog.text


def test_mlflows_dspy_callback_stays_on_the_driver(caplog):
    from mlflow.dspy.callback import MlflowCallback

    from dspy.utils.callback import BaseCallback

    mine = BaseCallback()
    caplog.set_level(logging.INFO, logger="bootfinetune")
    with dspy.context(callbacks=[MlflowCallback(), mine]):
        carried = driver_settings()
    assert carried["callbacks"] == [mine]


LATE_IMPORT = textwrap.dedent("""
    import sys, mlflow, dspy
    mlflow.set_tracking_uri(sys.argv[1])
    mlflow.dspy.autolog(log_compiles=True)
    from bootfinetune import BootstrapFinetune        # imported after autolog: a user's real order
    try:
        BootstrapFinetune().compile(dspy.Predict("q -> a"), trainset=[])   # fails fast, before any Ray
    except Exception as e:
        print("raised", type(e).__name__)
    runs = mlflow.MlflowClient(sys.argv[1]).search_runs(["0"])
    print("runs", [r.info.status for r in runs])
""")


def test_autolog_turned_on_before_the_import_records_our_compile(tmp_path):
    import os

    uri = (tmp_path / "mlruns").as_uri()
    out = subprocess.run([sys.executable, "-c", LATE_IMPORT, uri], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "raised ProgramError" in out.stdout
    assert "runs ['FAILED']" in out.stdout, out.stdout + out.stderr[-2000:]  # autolog's run around our compile
    assert not (Path(tmp_path) / "mlflow.db").exists()
