"""The stage order, and the stages that start from a run directory's data: finetune (4) and rebind (5) as
compile, retrain and DSPy's provider run them (`finetune_and_rebind`), and evaluate (6) on a finished
run (`evaluate_run`, the evaluate job). `BootstrapFinetune` (`bootfinetune.compiler`) runs stages 1-3
itself, then these.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import dspy

from bootfinetune.config import Config, InferenceConfig
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import ModelManifest, RunDescription
from bootfinetune.run.writer import RunWriter
from bootfinetune.runtime.console import set_console_output
from bootfinetune.runtime.ray_env import ensure_ray
from bootfinetune.stages.evaluate import evaluate_program
from bootfinetune.stages.finetune import finetune_models
from bootfinetune.stages.finetune_job import FinetuneJob
from bootfinetune.stages.rebind import load, program_class, program_state, rebind_run
from bootfinetune.training import tracking

logger = logging.getLogger("bootfinetune.compiler")  # the stage lines keep the logger users filter on

STAGES = ("checks", "bootstrap", "data", "finetune", "rebind", "evaluate")
"""The stages, in the one order they run."""


def stage_label(name: str) -> str:
    """A stage as the log names it, its place in `STAGES` included: `stage_label("data") == "stage 3/6 data"`."""
    return f"stage {STAGES.index(name) + 1}/{len(STAGES)} {name}"

def _short(values: list) -> str:
    shown = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in values]
    return "[" + ", ".join(shown if len(shown) <= 4 else shown[:2] + ["..."] + shown[-2:]) + "]"


@dataclass
class Trained:
    """Stages 4-5 done: each model key's manifest, and the program bound to the models when one was rebound."""

    manifests: dict[str, ModelManifest]
    """Each model key's manifest."""
    seconds: float
    """Wall time of the finetune stage."""
    compiled: dspy.Module | None = None
    """The program bound to the finetuned models (program.json written), None when not rebound."""
    program_note: str = "not rebound"
    """"written", or why program.json was not written."""


def finetune_and_rebind(run: RunDir, config: Config, description: RunDescription, jobs: list[FinetuneJob], *,
               to_stage: str = "rebind", program: dspy.Module | None = None, adapter: Any = None,
               ray_address: str | None = None) -> Trained:
    """Stage 4 (finetune, report.json's finetune section) then stage 5 (rebind, program.json), in order.

    The caller holds the run's writer lock (`bootfinetune.run.writer`), as compile and retrain do.

    Args:
        run: The run directory: data/ written, config.json being `description`.
        config: The run's configuration.
        described: config.json's record (model keys, adapter, program class).
        jobs: One finetune job per model key.
        to_stage: "finetune" stops after training; "rebind" also writes program.json.
        program: The program to bind (a compile's student); None imports `described.program_class`
            and skips the rebind, saying why, when it does not import here.
        adapter: The adapter the models were trained with; None: the one config.json records.
        ray_address: The Ray cluster to join (default: the config's, else the usual rule).
    """
    if to_stage not in ("finetune", "rebind"):
        raise ValueError(f"to_stage={to_stage!r}: finetune_and_rebind runs 'finetune' or 'rebind' (stages 4-5).")

    runs = tracking.training_runs(config.run.mlflow_tracking_uri, run.location)  # None unless a URI is set
    ensure_ray(ray_address or config.run.ray_address, log_to_driver=config.run.verbose)
    set_console_output(config.run.verbose)
    started = time.time()
    t = config.train
    logger.info("%s: %d model(s), %d Ray Train worker(s) per model (%s, zero_stage %s, %d epoch(s), "
                "bsize %d x accumsteps %d, lr %g)", stage_label("finetune"), len(jobs), t.num_workers,
                "GPU" if t.use_gpu else "CPU", t.zero_stage, t.epochs, t.bsize, t.accumsteps, t.lr)
    manifests = finetune_models(run, jobs, config.train, tracking=runs)
    seconds = round(time.time() - started, 3)
    for key, m in manifests.items():
        engine = "plain torch" if m.engine.get("engine") == "torch" else f"ZeRO-{m.engine.get('zero_stage', '?')}"
        logger.info("  model %s: train loss %s, eval loss %s, best epoch %s -> %s; engine %s (%s)", key, _short(
            m.losses["train"]), _short(m.losses["eval"]), m.best_epoch, run.model_dir(key), engine, m.engine.get("reason"))
    run.update_report(stages={"finetune": {"seconds": seconds, **{k: m.summary() for k, m in manifests.items()}}})
    trained = Trained(manifests, seconds)
    if to_stage == "rebind":
        trained.compiled, trained.program_note = rebind_stage(run, config, description, program, adapter)
    run.push()
    return trained


def rebind_stage(run: RunDir, config: Config, description: RunDescription, program: dspy.Module | None,
                 adapter: Any = None) -> tuple[dspy.Module | None, str]:
    """Stage 5: `program` bound to the run's models and saved as program.json; (it, "written") or (None, why not)."""
    if program is None:
        try:
            program = program_class(description.program_class or "", run.config_json)()
        except Exception as e:  # any import or constructor failure: the models stand, without program.json
            return None, f"program.json not written: {description.program_class} does not import here ({e})"
    compiled = rebind_run(program, run, description, inference=config.inference, trust_remote_code=config.train.trust_remote_code,
                          exclude_demos=config.bootstrap.exclude_demos, adapter=adapter)
    run.write_program(program_state(compiled))
    key_of = description.key_of()
    logger.info("%s: %s", stage_label("rebind"), ", ".join(f"{name} -> models/{run.folder(key_of[name])}"
                                                  for name in description.predictors or key_of))
    return compiled, "written"


def evaluate_run(run_dir: str, valset: list, metric: Callable, *, name: str = "eval",
                 num_threads: int = InferenceConfig.eval_threads, num_actors: int = 2,
                 about: dict[str, Any] | None = None, writer_wait_s: float = 0.0) -> dict[str, Any]:
    """Stage 6 on a finished run: its program (rebuilt from program.json) scored on `valset`.

    Writes `evaluations/{name}.json` in the run directory (a safe file name for any `name`, recorded in
    report.json's `evaluations`) and returns what it holds: score, examples, failed, seconds, usage (the
    program's LM tokens by model), then `about` (what the caller names the valset and metric by); the file also
    holds `name`. The run's writer lock is held from before the program is read (a compile or another evaluation
    of the run: `RunBusyError`, or a wait of `writer_wait_s`) until report.json is updated and synced.
    """
    run = RunDir.from_location(run_dir)
    with RunWriter(run, operation="evaluate", wait_s=writer_wait_s):
        program = load(run_dir)  # pulls after the lock: the report updated below is the latest
        trained = Config.from_dict(run.read_description().options).train  # where its models may run
        result = evaluate_program(program, valset, metric, num_threads=num_threads, num_actors=num_actors,
                                  placement=trained)
        out = {"score": result.score, "examples": len(valset), "failed": result.failed, "seconds": result.seconds,
               "usage": result.usage, **(about or {})}
        run.write_evaluation(name, out)
        run.push()
    return out
