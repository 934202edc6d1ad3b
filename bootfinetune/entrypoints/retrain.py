"""Train a finished run's teacher traces again with other training options: no teacher call.

    >>> from bootfinetune.entrypoints.retrain import retrain                                   # doctest: +SKIP
    >>> run, manifests = retrain("bootfinetune_runs/RAG-1a2b3c4d5e6f", lr=1e-4)    # doctest: +SKIP
    >>> program = bootfinetune.load(run.remote)                                    # doctest: +SKIP

Options that change what is trained (lr, epochs, bsize, target, LoRA, ZeRO stage, any
training or inference option) give a new run directory beside the old one, named as
`compile` names a compile with those options, so such a compile later finds it finished.
Its bootstrap/ and data/ are copied from the old run. A run whose name was fixed
(`run_name`) is trained in place. Resource options (cpus_per_worker, gpus_per_worker,
max_failures, ...) only change where the same training runs; `num_workers` and `use_gpu` are
training options (the global batch, the precision path) and give a new run. Bootstrap options change the
traces or the data: those need a compile (which still reuses every trace it can).
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from dataclasses import dataclass, replace

from bootfinetune.pipeline import finetune_and_rebind
from bootfinetune.config import FIELD_OWNER, RESOURCE_OPTIONS, Config, identity_options
from bootfinetune.errors import ConfigError
from bootfinetune.stages.finetune_job import FinetuneJob
from bootfinetune.run.rundir import RunDir, run_name_of
from bootfinetune.run.runfiles import ModelManifest, RunDescription
from bootfinetune.run.writer import RunWriter, writer_for

log = logging.getLogger(__name__)

RETRAINABLE_GROUPS = ("train", "inference")
"""Config groups whose options `retrain` may change."""


@dataclass
class Retrain:
    """A retrain made ready: where it trains, with what, and the jobs (`pipeline.finetune_and_rebind` runs them)."""

    run: RunDir
    """The run directory the models are written to (the old one, or a new one beside it)."""
    config: Config
    """The configuration with the options changed."""
    description: RunDescription
    """Its config.json (written)."""
    jobs: list[FinetuneJob]
    """One job per model key, on the run's saved data."""
    writer: RunWriter
    """`run`'s writer lock, held: `with ready.writer:` around the training releases it at the end."""


def retrain(run_dir: str, *, ray_address: str | None = None, **options: Any) -> tuple[RunDir, dict[str, ModelManifest]]:
    """Finetunes a run's models from its saved data with `options` changed; the teacher is not called.

    Args:
        run_dir: A run directory whose bootstrap finished (its folder or URI).
        ray_address: Ray cluster to join (None: $RAY_ADDRESS, else a running one, else a new local one; never
            the address the run recorded).
        **options: Training or inference options of `Config`, e.g. `lr=1e-4, epochs=2`, or
            `target="path/to/model"` for every model key.

    Returns:
        (the run directory the models were written to, each model key's manifest).

    Raises:
        ConfigError: when the run has no data yet, an option is not a training option, or the run was trained
            with trust_remote_code=True and `options` do not say it again (a run directory never turns it on).
    """
    ready = prepare_retrain(run_dir, **options)
    with ready.writer:
        trained = finetune_and_rebind(ready.run, ready.config, ready.description, ready.jobs, to_stage="finetune",
                             ray_address=ray_address)
    return ready.run, trained.manifests


def prepare_retrain(run_dir: str, **options: Any) -> Retrain:
    """Checks `options`, picks the run directory (seeded from the old one when new), writes its config.json.

    The returned `Retrain` holds that run directory's writer lock (taken before anything is written there).

    Raises:
        ConfigError: when the run has no data yet, or an option is not a training option.
        RunBusyError: when another process writes that run directory (after `writer_wait_s`).
    """
    run = RunDir.from_location(run_dir)
    run.pull()
    if not run.config_json.exists() or not run.data_dir.exists():
        raise ConfigError([f"run_dir {run_dir}: no config.json or data/ there; run the bootstrap (or compile) "
                           f"first and pass the run directory it printed."])
    description = run.read_description()
    flat = description.flat_options()
    if description.recorded_remote_code(run.config_json) and options.get("trust_remote_code") is not True:
        raise ConfigError([f"run_dir {run.location}: its models were trained with trust_remote_code=True, which lets "
                           f"the target's own code run; a run directory never turns it on by itself: pass "
                           f"trust_remote_code=True (--set trust_remote_code=true) if you trust the run and its target."])
    problems = [f"{k}={v!r}: a {FIELD_OWNER[k]} option (the run has {flat.get(k)!r}) changes the traces or the "
                f"data, not the training; compile again with it (teacher traces already made are reused)."
                for k, v in options.items() if k in FIELD_OWNER and FIELD_OWNER[k] not in RETRAINABLE_GROUPS
                and k not in RESOURCE_OPTIONS and flat.get(k) != v]
    if problems:
        raise ConfigError(problems)
    config = Config.from_options(**{**flat, **options})
    changed = {k: (flat.get(k), v) for k, v in options.items() if k not in RESOURCE_OPTIONS and flat.get(k) != v}
    if isinstance(options.get("target"), dict):
        raise ConfigError(["target: retrain takes one target for every model key; compile again for a "
                           "per-predictor target."])
    model_keys = {key: {**spec, "target": options["target"]} if "target" in options else spec
                  for key, spec in description.model_keys.items()}
    description = replace(description, options=config.to_dict(), model_keys=model_keys)
    dest = run
    if changed and not flat.get("run_name"):
        if description.inputs is None:
            raise ConfigError([f"run_dir {run_dir}: made by an older bootfinetune (config.json records no inputs); "
                               f"compile again with the new options."])
        inputs = {**description.inputs,
                  "options": identity_options(config)}
        dest = run.sibling(run_name_of(inputs))
        description.inputs = inputs
    writer = writer_for(dest, config.run, "retrain").acquire()
    try:
        return _write_retrain(run, dest, description, config, changed, model_keys, writer)
    except BaseException:
        writer.release()
        raise


def _write_retrain(run: RunDir, dest: RunDir, description: RunDescription, config: Config,
                   changed: dict[str, tuple[Any, Any]], model_keys: dict[str, dict], writer: RunWriter) -> Retrain:
    """prepare_retrain's writes, under `dest`'s writer lock: the seed, config.json, the jobs."""
    if dest != run:
        _seed(run, dest)
    if changed:
        log.info("training the traces of %s with %s into %s (no teacher call)", run.name,
                 ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()), dest.location)
    dest.write_description(description)
    # The tokens compile added (decided with the run's adapter) are reused, so the models of a retrain
    # tokenize as the compiled run's do; a run recorded without them is checked again in finetune_models.
    report = dest.update_report(retrained_from=run.location if dest != run else None)
    jobs = []
    for key, spec in model_keys.items():
        train_file = dest.data_file(key)
        if not train_file.exists():
            raise ConfigError([f"run_dir: {train_file} is missing; the bootstrap of this run did not finish."])
        eval_file = dest.data_file(key, "val")
        jobs.append(FinetuneJob(key=key, target=spec["target"], predictors=tuple(spec["predictors"]),
                                train_file=train_file, eval_file=eval_file if eval_file.exists() else None,
                                added_tokens=report.data_tokens(key)))
    return Retrain(dest, config, description, jobs, writer)


def _seed(src: RunDir, dest: RunDir) -> None:
    """Copies what training needs (bootstrap/, data/, the report's first stages) into a new run directory."""
    for sub in ("bootstrap", "data"):
        if src.path(sub).exists():
            shutil.copytree(src.path(sub), dest.path(sub), dirs_exist_ok=True)
    stages = src.read_report().stages
    dest.update_report(stages={k: stages[k] for k in ("bootstrap", "data") if k in stages})
