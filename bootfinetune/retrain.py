"""Train a finished run's teacher traces again with other training options: no teacher call.

    >>> from bootfinetune.retrain import retrain                                   # doctest: +SKIP
    >>> run, manifests = retrain("bootfinetune_runs/RAG-1a2b3c4d5e6f", lr=1e-4)    # doctest: +SKIP
    >>> program = bootfinetune.load(run.location)                                  # doctest: +SKIP

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

from bootfinetune.compiler import run_name_of
from bootfinetune.config import FIELD_OWNER, RESOURCE_OPTIONS, Config, identity_options
from bootfinetune.errors import ConfigError
from bootfinetune.finetune import FinetuneJob, finetune_models
from bootfinetune.jsonio import read_json, write_json
from bootfinetune.rundir import RunDir

log = logging.getLogger(__name__)

RETRAINABLE_GROUPS = ("train", "inference")
"""Config groups whose options `retrain` may change."""


def retrain(run_dir: str, *, ray_address: str | None = None, **options: Any) -> tuple[RunDir, dict[str, dict]]:
    """Finetunes a run's models from its saved data with `options` changed; the teacher is not called.

    Args:
        run_dir: A run directory whose bootstrap finished (its folder or URI).
        ray_address: Ray cluster to join (None joins a running one or starts a local one).
        **options: Training or inference options of `Config`, e.g. `lr=1e-4, epochs=2`, or
            `target="path/to/model"` for every model key.

    Returns:
        (the run directory the models were written to, each model key's manifest).

    Raises:
        ConfigError: when the run has no data yet, or an option is not a training option.
    """
    run = RunDir.from_location(run_dir)
    run.pull()
    if not run.config_json.exists() or not run.data_dir.exists():
        raise ConfigError([f"run_dir {run_dir}: no config.json or data/ there; run the bootstrap (or compile) "
                           f"first and pass the run directory it printed."])
    described = read_json(run.config_json)
    flat = {k: v for group in described["options"].values() for k, v in group.items()}
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
                  for key, spec in described["model_keys"].items()}
    described = {**described, "options": config.to_dict(), "model_keys": model_keys}
    dest = run
    if changed and not flat.get("run_name"):
        if "inputs" not in described:
            raise ConfigError([f"run_dir {run_dir}: made by an older bootfinetune (config.json records no inputs); "
                               f"compile again with the new options."])
        inputs = {**described["inputs"],
                  "options": identity_options(config)}
        dest = run.sibling(run_name_of(inputs))
        described["inputs"] = inputs
        _seed(run, dest)
    if changed:
        log.info("training the traces of %s with %s into %s (no teacher call)", run.name,
                 ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()), dest.location)
    write_json(dest.config_json, described)
    from bootfinetune.ray_env import ensure_ray

    ensure_ray(ray_address or config.run.ray_address)
    # The tokens compile added (decided with the run's adapter) are reused, so the models of a retrain
    # tokenize as the compiled run's do; a run recorded without them is checked again in finetune_models.
    recorded = dest.read_report().get("stages", {}).get("data", {}).get("tokens", {})
    jobs = []
    for key, spec in model_keys.items():
        train_file = dest.data_file(key)
        if not train_file.exists():
            raise ConfigError([f"run_dir: {train_file} is missing; the bootstrap of this run did not finish."])
        eval_file = dest.data_dir / "val" / f"{key}.jsonl"
        jobs.append(FinetuneJob(key=key, target=spec["target"], predictors=tuple(spec["predictors"]),
                                train_file=train_file, eval_file=eval_file if eval_file.exists() else None,
                                added_tokens=_recorded_tokens(recorded.get(key))))
    manifests = finetune_models(dest, jobs, config.train)
    dest.update_report(stages={"finetune": {k: {"best_epoch": m["best_epoch"], "eval_loss": m["losses"]["eval"]}
                                            for k, m in manifests.items()}},
                       retrained_from=run.location if dest != run else None)
    dest.sync()
    return dest, manifests


def _recorded_tokens(plan: dict | None) -> tuple[str, ...] | None:
    """The tokens a key's data stage added (report.json), or None where the run has no record of them."""
    if not plan or plan.get("added_tokens") is None:
        return None
    return tuple(plan["added_tokens"])


def _seed(src: RunDir, dest: RunDir) -> None:
    """Copies what training needs (bootstrap/, data/, the report's first stages) into a new run directory."""
    for sub in ("bootstrap", "data"):
        if (src.root / sub).exists():
            shutil.copytree(src.root / sub, dest.root / sub, dirs_exist_ok=True)
    stages = src.read_report().get("stages", {})
    dest.update_report(stages={k: stages[k] for k in ("bootstrap", "data") if k in stages})
