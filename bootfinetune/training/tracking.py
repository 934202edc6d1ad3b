"""Experiment tracking with MLflow (the optional extra `bootfinetune[mlflow]`).

Two things are tracked, and neither needs MLflow when it is not in use (nothing here imports it
until a tracking URI is set or the user has imported it):

- **The compile**, in the user's active MLflow run (the one `mlflow.dspy.autolog(log_compiles=True)`
  starts around `compile`, or the user's own `mlflow.start_run()`): `log_compile_result` adds the
  metric before/after finetuning (and the teacher's), teacher calls and tokens, and tags the run
  with the run directory. `patch_for_autolog` (called as a `BootstrapFinetune` is made) makes autolog record
  our `compile` when it was turned on before bootfinetune was imported (autolog patches only the
  Teleprompter subclasses that exist then).
- **Training**, when a tracking URI is set (`resolve_uri`): the `mlflow_tracking_uri` option, else
  MLflow's own (`mlflow.set_tracking_uri`, `MLFLOW_TRACKING_URI`, or the URI of an active run).
  `TrainingRuns` (driver) creates one MLflow run per model key, nested under the active run when
  there is one, with the training options as params and the run directory and model key as tags;
  `StepTracker` (rank 0 of the Ray Train workers) logs into it: `train_loss_step` per point of the
  loss curve, `train_loss` and `eval_loss` per epoch (`eval_loss` at step 0 is before training).
  A restarted worker group gets the same run id from its loop config, so a restart continues the run.

A tracking URI may hold credentials (`https://user:token@host`): it reaches the workers through the
object store, never a file, and is shown only through `redact_uri`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bootfinetune.common.redaction import redact_uri, redact_urls_in
from bootfinetune.errors import ConfigError

log = logging.getLogger(__name__)

OPTION = "mlflow_tracking_uri"
ENV = "MLFLOW_TRACKING_URI"
INSTALL = "pip install 'bootfinetune[mlflow]'"
FLUSH_EVERY_S = 10.0
"""Least time between two batches of step metrics sent from rank 0 (epoch ends always send)."""
TAG = "bootfinetune."
"""Prefix of the tags we set on MLflow runs."""
_SAID: list[bool] = []
"""Whether the driver-only callback line was logged (once per process)."""


def _mlflow_loaded() -> Any:
    """The mlflow module when the user (or autolog) has imported it, else None; never imports it."""
    return sys.modules.get("mlflow")


def resolve_uri(option: str | None) -> tuple[str | None, str]:
    """The tracking URI training logs to, and where it came from; (None, "") when none is set.

    In order: the `mlflow_tracking_uri` option; MLflow's own in this process (`mlflow.set_tracking_uri`,
    `MLFLOW_TRACKING_URI`, or the default one when a run is active: the user is tracking); the environment
    variable. A local path (or relative sqlite file) is made absolute: the workers run elsewhere.

    >>> resolve_uri("file:///tmp/mlruns")
    ('file:///tmp/mlruns', 'mlflow_tracking_uri')
    """
    if option:
        return _absolute(option), OPTION
    mlflow = _mlflow_loaded()
    if mlflow is not None:
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

        if is_tracking_uri_set() or mlflow.active_run() is not None:
            return _absolute(mlflow.get_tracking_uri()), "mlflow"
    if os.environ.get(ENV):
        return _absolute(os.environ[ENV]), ENV
    return None, ""


def _absolute(uri: str) -> str:
    """`uri` with a local path made absolute (`./mlruns` -> file:///.../mlruns, sqlite:///x.db -> sqlite:////.../x.db).

    >>> _absolute("http://host:5000")
    'http://host:5000'
    """
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return Path(uri).absolute().as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).absolute())
    return uri


def problems(option: str | None) -> list[str]:
    """What stops training tracking before any expensive work: a URI set while MLflow is not installed."""
    uri, source = resolve_uri(option) if option or os.environ.get(ENV) else (None, "")
    if uri is None:
        return []
    try:
        import mlflow  # noqa: F401
    except ImportError:
        named = f"{OPTION}={redact_uri(uri)!r}" if source == OPTION else f"${ENV} ({redact_uri(uri)})"
        return [f"{named}: training runs are logged to MLflow, which is not installed; {INSTALL}, "
                f"or {'leave ' + OPTION + ' unset' if source == OPTION else 'unset ' + ENV}."]
    return []


def check(option: str | None) -> None:
    """Raises `problems` as one ConfigError (a compile calls it before any expensive work)."""
    found = problems(option)
    if found:
        raise ConfigError(found)


# -- the compile, in the user's active run (driver) -------------------------------------------------

def patch_for_autolog(cls: type) -> None:
    """Has `mlflow.dspy.autolog(log_compiles=True)` record `cls.compile` when autolog was turned on before
    `cls` existed (it patches only the Teleprompter subclasses defined when it is called), by turning it on
    again with the same settings (which patches every subclass, ours now among them, once)."""
    mlflow = _mlflow_loaded()
    if mlflow is None or "mlflow.dspy" not in sys.modules:
        return
    from mlflow.utils import gorilla
    from mlflow.utils.autologging_utils import autologging_is_disabled, get_autologging_config

    if autologging_is_disabled("dspy") or not get_autologging_config("dspy", "log_compiles", False):
        return
    if gorilla.get_original_attribute(cls, "compile") is not cls.__dict__.get("compile"):
        return  # already patched
    names = ("log_traces", "log_traces_from_compile", "log_traces_from_eval", "log_compiles", "log_evals", "silent")
    settings = {n: get_autologging_config("dspy", n) for n in names}
    mlflow.dspy.autolog(**{n: v for n, v in settings.items() if v is not None})
    log.info("mlflow.dspy.autolog(log_compiles=True) was turned on before bootfinetune was imported: "
             "turned on again with the same settings so that %s.compile is recorded too", cls.__name__)


def actor_callbacks(callbacks: list) -> list:
    """The `dspy.configure(callbacks=...)` to carry to Ray actors: all but MLflow's `MlflowCallback`.

    It only records where `mlflow.dspy.autolog` ran (the driver): in an actor it has no autolog settings
    and does nothing, and unpickling it there would need mlflow on every worker. Said once.
    """
    kept = [c for c in callbacks if type(c).__module__ != "mlflow.dspy.callback"]
    if len(kept) != len(callbacks) and not _SAID:
        _SAID.append(True)
        log.info("MLflow's DSPy callback (mlflow.dspy.autolog) stays on the driver: Ray actors run without it; "
                 "the compile, its evaluation and training are still tracked from the driver and rank 0")
    return kept


def usage_totals(report: dict[str, Any]) -> dict[str, float]:
    """Teacher calls and tokens (trainset and valset), summed over models, from report.json's bootstrap stage.

    >>> usage_totals({"stages": {"bootstrap": {"teacher_calls": 3, "usage": {"m": {"prompt_tokens": 10,
    ...     "completion_tokens": 2, "cost_usd": None}}, "val": None}}})
    {'teacher_calls': 3.0, 'teacher_prompt_tokens': 10.0, 'teacher_completion_tokens': 2.0}
    """
    boot = (report.get("stages") or {}).get("bootstrap") or {}
    splits = [boot] + ([boot["val"]] if boot.get("val") else [])
    totals: dict[str, float] = {"teacher_calls": float(sum(s.get("teacher_calls") or 0 for s in splits))}
    for part in ("prompt_tokens", "completion_tokens"):
        values = [u.get(part) for s in splits for u in (s.get("usage") or {}).values()]
        if any(v is not None for v in values):
            totals[f"teacher_{part}"] = float(sum(v or 0 for v in values))
    costs = [u.get("cost_usd") for s in splits for u in (s.get("usage") or {}).values()]
    if costs and all(c is not None for c in costs):  # an unknown price is left out, not logged as 0
        totals["teacher_cost_usd"] = float(sum(costs))
    return totals


def log_compile_result(run_location: str, report: dict[str, Any]) -> None:
    """Logs the metric before/after (and the teacher's), teacher usage and the run directory into the
    user's active MLflow run; nothing without one. A tracking failure is a warning, never a failed compile."""
    mlflow = _mlflow_loaded()
    if mlflow is None or mlflow.active_run() is None:
        return
    metric = report.get("metric") or {}
    values = {f"metric_{k}": float(metric[k]) for k in ("before", "after", "teacher")
              if isinstance(metric.get(k), (int, float))}
    values.update(usage_totals(report))
    try:
        mlflow.log_metrics(values)
        mlflow.set_tags({TAG + "run_dir": redact_uri(run_location)})
    except Exception as exc:  # the compile is done and saved; tracking must not undo it
        log.warning("could not log the compile's results to MLflow run %s: %s", mlflow.active_run().info.run_id,
                    redact_urls_in(str(exc)))


# -- training runs: created on the driver, logged into from rank 0 ---------------------------------

class TrainingRuns:
    """On the driver: one MLflow run per model key trained, nested under the active run when there is one."""

    def __init__(self, uri: str, source: str, run_location: str):
        from mlflow import MlflowClient

        self.uri, self.location = uri, redact_uri(run_location)
        self.client = MlflowClient(uri)
        mlflow = _mlflow_loaded()
        active = mlflow.active_run() if mlflow is not None else None
        self.parent = active.info.run_id if active and _absolute(mlflow.get_tracking_uri()) == uri else None
        if self.parent:
            self.experiment_id = active.info.experiment_id
        else:
            self.experiment_id = _experiment_id(self.client)
            if active is not None:
                log.info("MLflow: training runs go to %s, not to the active run's store: not nested under it",
                         redact_uri(uri))
        self.run_ids: dict[str, str] = {}
        log.info("MLflow: a run per model key at %s (from %s)%s", redact_uri(uri), source,
                 f", nested under run {self.parent}" if self.parent else "")

    def start(self, key: str, target: str, config: Any) -> dict[str, Any] | None:
        """Creates `key`'s run with the options as params; returns what `LoopConfig.tracking` carries:
        the run id and the connection (URI and MLflow's environment variables: credentials, which the
        caller puts in the object store), or None when MLflow cannot be reached."""
        from mlflow.entities import Param

        tags = {TAG + "run_dir": self.location, TAG + "model_key": key, TAG + "target": redact_uri(target)}
        if self.parent:
            tags["mlflow.parentRunId"] = self.parent
        options = {**{k: v for k, v in asdict(config).items() if k != "target"}, "target": redact_uri(target)}
        try:
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=f"finetune {key}").info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(options.items())])
        except Exception as exc:  # training goes on untracked rather than not at all
            log.warning("MLflow: could not create a run for model %r at %s; it trains untracked: %s", key,
                        redact_uri(self.uri), redact_urls_in(str(exc)))
            return None
        self.run_ids[key] = run_id
        return {"run_id": run_id, "connection": {"uri": self.uri, "env": mlflow_env()}}

    def end(self, key: str, ok: bool) -> None:
        """Marks `key`'s run FINISHED or FAILED (a warning if the server cannot be reached)."""
        if key not in self.run_ids:
            return
        try:
            self.client.set_terminated(self.run_ids[key], "FINISHED" if ok else "FAILED")
        except Exception as exc:  # the model is trained (or failed) either way; say it, do not raise
            log.warning("MLflow: could not end run %s of model %r: %s", self.run_ids[key], key,
                        redact_urls_in(str(exc)))


def mlflow_env() -> dict[str, str]:
    """The driver's MLflow environment variables (MLFLOW_TRACKING_TOKEN, _USERNAME, _PASSWORD,
    MLFLOW_ALLOW_FILE_STORE...): rank 0 connects the way the driver does, wherever it runs."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_") and k != "MLFLOW_RUN_ID" and v}


def _experiment_id(client: Any) -> str:
    """The experiment MLflow's environment names (MLFLOW_EXPERIMENT_ID / _NAME), else the default one."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found else client.create_experiment(name)
    return "0"


def training_runs(option: str | None, run_location: str) -> TrainingRuns | None:
    """The driver's `TrainingRuns` when a tracking URI is set (`resolve_uri`), else None."""
    uri, source = resolve_uri(option)
    if uri is None:
        return None
    check(option)
    return TrainingRuns(uri, source, run_location)


class StepTracker:
    """On rank 0: logs the loop state's new loss-curve points and finished epochs into the key's run."""

    def __init__(self, tracking: dict[str, Any], state: Any):
        from mlflow import MlflowClient

        connection = tracking["connection"]
        if not isinstance(connection, dict):  # under Ray Train it comes through the object store
            import ray

            connection = ray.get(connection)
        os.environ.update(connection["env"])  # rank 0's own process: credentials the client reads
        self.client, self.run_id = MlflowClient(connection["uri"]), tracking["run_id"]
        self._points, self._epochs = len(state.loss_curve), len(state.history)  # logged by an earlier start
        self._before = state.eval_loss_before is not None
        self._pending: list[Any] = []
        self._flushed = time.time()
        self._failed = False

    def update(self, state: Any, force: bool = False) -> None:
        """Queues what `state` gained since the last call; sends it every `FLUSH_EVERY_S` or when forced."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if not self._before and state.eval_loss_before is not None:
            self._pending.append(Metric("eval_loss", float(state.eval_loss_before), now, 0))
            self._before = True
        for step, loss in state.loss_curve[self._points:]:
            self._pending.append(Metric("train_loss_step", float(loss), now, int(step)))
        for h in state.history[self._epochs:]:
            for name in ("train_loss", "eval_loss", "tokens_per_second"):
                if h.get(name) is not None:
                    self._pending.append(Metric(name, float(h[name]), now, int(h["epoch"])))
        self._points, self._epochs = len(state.loss_curve), len(state.history)
        if self._pending and (force or time.time() - self._flushed >= FLUSH_EVERY_S):
            self.flush()

    def flush(self) -> None:
        """Sends the queued metrics (MLflow takes at most 1000 per batch); a failure is said once, not raised."""
        pending, self._pending, self._flushed = self._pending, [], time.time()
        try:
            for i in range(0, len(pending), 1000):
                self.client.log_batch(self.run_id, metrics=pending[i:i + 1000])
        except Exception as exc:  # training goes on: losing metrics is not worth losing the model
            if not self._failed:
                self._failed = True
                log.warning("MLflow: could not log training metrics to run %s: %s", self.run_id,
                            redact_urls_in(str(exc)))


def open_tracker(tracking: dict[str, Any] | None, state: Any, rank: int) -> StepTracker | None:
    """Rank 0's `StepTracker` when the driver created a run for this model (`LoopConfig.tracking`), else None."""
    if rank != 0 or not tracking:
        return None
    try:
        return StepTracker(tracking, state)
    except Exception as exc:  # training goes on untracked
        log.warning("MLflow: cannot log to run %s; training goes on untracked: %s", tracking.get("run_id"),
                    redact_urls_in(str(exc)))
        return None
