"""Stage 4's last step: the best kept epoch of a trained key as `models/{folder}/`, and its manifest.

`export_model` runs the export (`training.export.export_checkpoint`) where a model may run
(`bootfinetune.runtime.placement`): in a Ray task holding one training worker's resources when the
training asked for an accelerator (the driver's head may have none, nor the memory for the model),
else in this process. The folder is written where the run lives: in place in a folder every node
shares; for a run on a cloud URI, into the exporting node's mirror of the run and up to the URI,
from which the driver's mirror fetches it.

The new export is staged beside the model it replaces (`RunDir.model_staging`): the driver writes its
manifest into it and swaps it in (`RunDir.swap_model`), so a retrain's model is kept until the new one is
complete. An export a Ray task made for a cloud run is put in place in that node's mirror and uploaded to the
URI's models/{folder}/ (an object store has no rename); its manifest goes up last, with the driver's push.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bootfinetune.common.redaction import redact_uri
from bootfinetune.config import TrainConfig
from bootfinetune.errors import FinetuneError
from bootfinetune.run import storage
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import ModelManifest
from bootfinetune.runtime.placement import needs_accelerator, ray_options, worker_resources
from bootfinetune.stages.finetune_job import StagedJob
from bootfinetune.stages.fingerprints import data_hash
from bootfinetune.stages.train_runs import Outcome
from bootfinetune.training.checkpoints import best_epoch, epoch_name, local_copy, whole_epochs
from bootfinetune.training.distributed import node_id
from bootfinetune.training.export import export_checkpoint, trained_config
from bootfinetune.training.render import renderer_identity

log = logging.getLogger(__name__)


def export_model(run: RunDir, key: str, checkpoints: str, epoch: int, *, target: str, kind: str, config: TrainConfig,
                 tokenizer: Any, base_vocab: int) -> tuple[dict[str, Any] | None, str | None, Path | None]:
    """Writes model `key`'s export from the checkpoint of epoch `epoch`, where a model may run.

    Args:
        run: The run directory. key: the model key.
        checkpoints: The key's checkpoint folder (`RunDir.checkpoint_location`: a path every node sees, or a URI).
        config: The training options, with the engine the loop chose (`trained_config`).
        tokenizer: The target's tokenizer with the tokens added for training; `base_vocab` its size before.

    Returns:
        (the LoRA adapter's facts for the manifest, or None for a full model; the Ray node that exported it;
        the staged export for `RunDir.swap_model`, or None when a Ray task put a cloud run's export in place).
    """
    args = (run, key, checkpoints, epoch, target, kind, config, tokenizer, base_vocab)
    if not needs_accelerator(config):
        return _export_here(*args, in_driver=True)
    import ray

    task = ray.remote(_export_here).options(**ray_options(worker_resources(config)), max_retries=1)
    lora, node, staged = ray.get(task.remote(*args))
    run.pull()  # a cloud run's export went up from the node that wrote it
    return lora, node, staged


def _export_here(run: RunDir, key: str, checkpoints: str, epoch: int, target: str, kind: str, config: TrainConfig,
                 tokenizer: Any, base_vocab: int, in_driver: bool = False) -> tuple[dict[str, Any] | None, str | None,
                                                                                    Path | None]:
    """`export_model`'s work, in whichever process runs it."""
    staged = run.model_staging(key)
    with tempfile.TemporaryDirectory(prefix="bootfinetune-export-") as scratch:
        ckpt_dir = local_copy(checkpoints, epoch, Path(scratch))
        lora = export_checkpoint(ckpt_dir, epoch, target, kind, staged, config, tokenizer=tokenizer,
                                 base_vocab=base_vocab)
    tokenizer.save_pretrained(staged)
    if run.remote is None or in_driver:
        return lora, node_id(), staged  # the driver sees this folder: it swaps it in after the manifest
    out = run.model_dir(key)  # this node's mirror of a cloud run: in place, then up to the URI
    run.remove("models", out.name)
    os.replace(staged, out)
    storage.push(run.root, run.remote, only=[p.relative_to(run.root).as_posix() for p in out.rglob("*")])
    return lora, node_id(), None


def export_best_epoch(run: RunDir, staged: StagedJob, config: TrainConfig, outcome: Outcome) -> ModelManifest:
    """The best kept epoch of a trained key as models/{folder}/, and its manifest (written last, then pushed)."""
    state = outcome.state or {}
    best = _best_kept_epoch(staged, state["history"])
    export_started = time.time()
    lora, export_node, staged_export = export_model(
        run, staged.job.key, staged.trainee.checkpoint_dir, best, target=staged.job.target, kind=staged.kind,
        config=trained_config(config, state), tokenizer=staged.tokenizer, base_vocab=staged.base_vocab)
    timings = _timings(state, outcome.begin, outcome.end - outcome.begin, time.time() - export_started)
    manifest = _manifest(run, staged, config, outcome, best=best, lora=lora, export_node=export_node, timings=timings)
    if staged_export is not None:  # the manifest last (its presence means the key is finished), then in place
        run.swap_model(manifest, staged_export)
    else:
        run.write_manifest(manifest)
    run.push()
    return manifest


def _best_kept_epoch(staged: StagedJob, history: list[dict[str, Any]]) -> int:
    """The epoch with the lowest eval loss among those whose checkpoint is kept."""
    place = staged.trainee.checkpoint_dir
    kept = set(whole_epochs(place))
    best = best_epoch([h for h in history if h["epoch"] in kept] or history)
    if best not in kept:
        raise FinetuneError(f"model {staged.job.key!r}: no checkpoint of epoch {best} in {redact_uri(place)}.")
    return best


def _manifest(run: RunDir, staged: StagedJob, config: TrainConfig, outcome: Outcome, *, best: int,
              lora: dict[str, Any] | None, export_node: str | None, timings: dict[str, float]) -> ModelManifest:
    """The manifest of a key exported from epoch `best`: what it was trained on, how, and where its time went."""
    job, state, place = staged.job, outcome.state or {}, staged.trainee.checkpoint_dir
    history = state["history"]
    train_n, eval_n, eval_source = staged.records
    return ModelManifest(
        key=job.key,
        folder=run.model_dir(job.key).name,
        target=job.target,
        predictors=list(job.predictors),
        model_kind=staged.kind,
        renderer=renderer_identity(staged.tokenizer, staged.kind),
        data_file=str(job.train_file),
        data_hash=data_hash(job.train_file),
        eval_hash=data_hash(job.eval_file) if job.eval_file else None,
        train_records=train_n,
        eval_records=eval_n,
        eval_source=eval_source,
        epochs=config.epochs,
        losses={"train": [h["train_loss"] for h in history], "eval": [h["eval_loss"] for h in history]},
        eval_loss_before=state["eval_loss_before"],
        best_epoch=best,
        best_eval_loss=history[best - 1]["eval_loss"],
        tokens_seen={"answer": sum(h["answer_tokens"] for h in history),
                     "total": sum(h["tokens"] for h in history),
                     "padding": sum(h["padded_tokens"] for h in history)},
        seconds=round(state["seconds"], 3),
        wall_seconds=round(outcome.end - outcome.begin + timings["export_seconds"], 3),
        started_at=round(outcome.begin, 3),
        finished_at=round(outcome.end, 3),
        truncated={"train": state["truncated_train"], "eval": state["truncated_eval"],
                   "max_length": config.max_length,
                   # inference cuts a causal prompt to the room training left it beside a typical answer
                   "prompt_max_length": config.max_length - (state.get("answer_tokens_median", 0)
                                                              if staged.kind == "causal" else 0)},
        answer_tokens_max=state.get("answer_tokens_max") or None,
        dropped_per_epoch=state["dropped_per_epoch"],
        world_size=state["world_size"],
        engine=state.get("engine") or {},
        timings=timings,
        nodes=state.get("nodes", []),
        export_node=export_node,
        starts=state["starts"],
        history=history,
        loss_curve=state.get("loss_curve", []),
        checkpoint=redact_uri(storage.join_uri(place, epoch_name(best))) if storage.is_uri(place)
        else str(Path(place) / epoch_name(best)),
        train_config=dataclasses.asdict(config),
        lora=lora,
        added_tokens=list(job.added_tokens or ()),
        job_fingerprint=staged.job_fp,
    )


def _timings(state: dict[str, Any], fit_started: float, fit_seconds: float, export_seconds: float) -> dict[str, float]:
    """Where the job's time went (the manifest's `timings`), from the driver's clock and the loop's state."""
    loop, train = state.get("timings") or {}, sum(h.get("train_seconds", 0.0) for h in state["history"])
    out = {"fit_seconds": fit_seconds, "train_seconds": train, "export_seconds": export_seconds,
           "setup_seconds": loop.get("setup_seconds"), "checkpoint_seconds": loop.get("checkpoint_seconds"),
           "eval_seconds": loop.get("eval_seconds")}
    # times from this fit only: a loop that found every epoch done (killed before export) returns an older state
    if len(state["starts"]) == 1 and loop.get("loop_started_at", 0) >= fit_started:  # Ray Train's start
        out["ray_train_start_seconds"] = loop["loop_started_at"] - fit_started
    if loop.get("reported_at", 0) >= fit_started:  # the last checkpoint's writing and report, Ray Train's teardown
        out["ray_train_end_seconds"] = fit_started + fit_seconds - loop["reported_at"]
    return {k: round(v, 3) for k, v in out.items() if v is not None}
