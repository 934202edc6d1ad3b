"""Stage 4, finetune: the models of a compile scheduled on Ray Train + DeepSpeed, then a Hugging Face export each.

`finetune_models(run, jobs, config)` trains every `FinetuneJob` on `num_workers` Ray Train workers. The
models share Ray Train runs: as many run side by side as the cluster has room for, and each run trains its
models one after another in one worker group (`train_runs`), so a compile pays Ray Train's start and the
workers' set-up once per run, not once per model. Each finished key gets `models/{folder}/` (the key's safe
folder name, `RunDir.folder`): the best epoch (lowest eval loss) as a consolidated Hugging Face directory
(safetensors, config, tokenizer, generation config; `stages/export.py`) and `manifest.json`, written last.

Resuming: a key whose manifest shows the same target, data and training options is not trained again (one
that differs is retrained, and the log says what changed). Each key's checkpoints live in its own folder,
`checkpoints/{folder}/epoch_{NNN}` (the best epoch and the latest are kept), so a key whose driver died
mid-training resumes from its last checkpoint when the same call runs again, and a run that failed restarts
from it (`max_failures` times per key; a key given up does not stop the others).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import ray

from bootfinetune.config import TrainConfig
from bootfinetune.errors import FinetuneError
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import JobStamp, ModelManifest
from bootfinetune.runtime.console import progress_drawer
from bootfinetune.runtime.ray_env import ensure_ray
from bootfinetune.stages.export import export_best_epoch
from bootfinetune.stages.finetune_job import FinetuneJob, StagedJob, load_job_data, worker_rows
from bootfinetune.stages.fingerprints import data_hash, finished_manifest, job_fingerprint
from bootfinetune.stages.token_plan import check_lora, plan_for_files, raise_if_unfixable
from bootfinetune.stages.train_runs import Trainee, train_in_lanes
from bootfinetune.training.answer_tokens import add_answer_tokens
from bootfinetune.training.render import model_kind

log = logging.getLogger(__name__)


def finetune_models(run: RunDir, jobs: list[FinetuneJob], config: TrainConfig, *,
                    hooks: dict[str, dict[str, Any]] | None = None, tracking: Any = None) -> dict[str, ModelManifest]:
    """Finetunes every job (side by side when the cluster has room) and exports each model.

    Args:
        run: The run directory (checkpoints/ and models/ are written).
        jobs: One job per model key.
        config: Training options, shared by every job (each job has its own target).
        hooks: Extra `LoopConfig` fields per key, merged into that key's loop config (e.g.
            `{"all": {"on_step": testing.FailOnce("/tmp/x")}}` in the fault tests); not for normal use.
        tracking: `training.tracking.TrainingRuns`: an MLflow run per key trained, logged into from rank 0.

    Returns:
        Each key's manifest (the record models/{key}/manifest.json holds).

    Raises:
        FinetuneError: naming every key that failed and its cause, after the other jobs finished.
        ConfigError: before any training, an answer a target's tokenizer cannot write (see `training.answer_tokens`).
    """
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise FinetuneError(f"duplicate model keys {sorted(k for k in set(keys) if keys.count(k) > 1)}: one job per key.")
    jobs = decide_tokens(jobs, config)  # before Ray: an answer the tokenizer cannot write stops here
    ensure_ray()  # the compiler connects first; a stage run alone joins or starts Ray the package's way
    manifests, pending = _finished_and_pending(run, jobs, config)
    errors: dict[str, BaseException] = {}
    drawer = progress_drawer([j.key for j in pending]) if pending else None  # bars on a terminal, else lines
    with drawer if drawer is not None else contextlib.nullcontext():
        progress = {"progress_board": drawer.name, "progress_namespace": drawer.namespace} if drawer else {}
        staged = _stage_all(run, pending, config, progress, hooks or {}, errors)
        _start_tracking(staged, config, tracking)
        manifests |= _train_and_export(run, staged, config, tracking, errors)
    if errors:
        detail = "; ".join(f"{k!r}: {e}" for k, e in errors.items())
        raise FinetuneError(f"finetuning failed for model key(s) {sorted(errors)}: {detail}") from next(iter(errors.values()))
    return {k: manifests[k] for k in keys}


def _finished_and_pending(run: RunDir, jobs: list[FinetuneJob], config: TrainConfig
                          ) -> tuple[dict[str, ModelManifest], list[FinetuneJob]]:
    """(the manifests of keys already finetuned on the same data and options, the jobs left to train)."""
    manifests: dict[str, ModelManifest] = {}
    pending = []
    for job in jobs:
        done = finished_manifest(run, job, config)
        if done is not None:
            log.info("model %r is already finetuned (%s); not training it again", job.key, run.model_dir(job.key))
            manifests[job.key] = done
        else:
            pending.append(job)
    return manifests, pending


def _stage_all(run: RunDir, jobs: list[FinetuneJob], config: TrainConfig, progress: dict[str, Any],
               hooks: dict[str, dict[str, Any]], errors: dict[str, BaseException]) -> dict[str, StagedJob]:
    """Each job staged for its workers; a job that cannot be is recorded in `errors` (the others still train)."""
    staged = {}
    for job in jobs:
        try:
            staged[job.key] = _stage(run, job, config, {**progress, "progress_key": job.key, **hooks.get(job.key, {})})
        except Exception as e:  # this key only: the others still train
            errors[job.key] = _named(job, e)
    return staged


def _start_tracking(staged: dict[str, StagedJob], config: TrainConfig, tracking: Any) -> None:
    """An MLflow run per staged key when tracking is on; its connection reaches the workers by reference."""
    for key, s in staged.items():
        if tracking is not None and (spec := tracking.start(key, s.job.target, config)):
            s.trainee.loop_config["tracking"] = {**spec, "connection": ray.put(spec["connection"])}  # never in a file


def _train_and_export(run: RunDir, staged: dict[str, StagedJob], config: TrainConfig, tracking: Any,
                      errors: dict[str, BaseException]) -> dict[str, ModelManifest]:
    """Trains the staged keys in Ray Train runs (`train_runs`) and exports each one that finished; a key that
    fails is recorded in `errors` once every run has ended."""
    storage_path, storage_fs = run.checkpoint_storage()
    budget = {k: float(v) for k, v in ray.available_resources().items()}
    outcomes = train_in_lanes([s.trainee for s in staged.values()], config, storage_path, storage_fs, budget)
    manifests = {}
    for key, outcome in outcomes.items():
        try:
            if outcome.error is not None:
                raise outcome.error
            manifests[key] = export_best_epoch(run, staged[key], config, outcome)
        except Exception as e:  # collected, raised once every job has ended
            errors[key] = _named(staged[key].job, e)
        if tracking is not None:
            tracking.end(key, ok=key not in errors)
    return manifests


def decide_tokens(jobs: list[FinetuneJob], config: TrainConfig) -> list[FinetuneJob]:
    """The jobs with `added_tokens` decided, checking the data where the caller did not (layout comparison).

    Raises:
        ConfigError: an answer the target's tokenizer loses even with added tokens, or LoRA with added tokens.
    """
    plans = {j.key: plan_for_files(j.key, j.target, [j.train_file, j.eval_file],
                                   trust_remote_code=config.trust_remote_code)
             for j in jobs if j.added_tokens is None}
    raise_if_unfixable(plans.values())
    decided = [dataclasses.replace(j, added_tokens=tuple(plans[j.key].added_tokens)) if j.key in plans else j
               for j in jobs]
    check_lora(decided, config.lora)  # the caller's tokens too (a retrain reuses the compile's)
    return decided


def _named(job: FinetuneJob, e: BaseException) -> FinetuneError:
    """Every failure of a key comes out as a FinetuneError naming it."""
    if isinstance(e, FinetuneError):
        return e
    error = FinetuneError(f"finetuning model {job.key!r} (target {job.target!r}) failed: {type(e).__name__}: {e}")
    error.__cause__ = e
    return error


def _stage(run: RunDir, job: FinetuneJob, config: TrainConfig, hooks: dict[str, Any]) -> StagedJob:
    """Reads and checks a key's data, loads its tokenizer, clears checkpoints of other data or options, and
    puts its records in the object store for its workers."""
    from transformers import AutoConfig, AutoTokenizer  # reason: loaded when a key trains, not with the stage

    train_records, eval_records, eval_source = load_job_data(job, config)
    kind = model_kind(AutoConfig.from_pretrained(job.target, trust_remote_code=config.trust_remote_code))
    tokenizer = AutoTokenizer.from_pretrained(job.target, trust_remote_code=config.trust_remote_code)
    base_vocab = len(tokenizer)
    add_answer_tokens(tokenizer, job.added_tokens or ())

    job_fp = job_fingerprint(job, config)
    stamp = run.read_job_stamp(job.key)
    if stamp is not None and stamp.job_fingerprint != job_fp:
        log.warning("checkpoints in %s are from other data or options; starting %r over", run.checkpoint_dir(job.key),
                    job.key)
        run.remove_checkpoints(job.key)
    run.write_job_stamp(JobStamp(job_fingerprint=job_fp, key=job.key, target=job.target))
    run.push()
    place = run.checkpoint_location(job.key)  # on a cloud URI, the workers write the checkpoints there
    loop_config = {"target": job.target, "train": dataclasses.asdict(config), "ray": True,
                   "train_ref": ray.put(worker_rows(train_records)),
                   "eval_ref": ray.put(worker_rows(eval_records)) if eval_records else None, "checkpoint_dir": place,
                   "data_hash": data_hash(job.train_file), "added_tokens": list(job.added_tokens or ()), **hooks}
    return StagedJob(job, Trainee(job.key, loop_config, place), (len(train_records), len(eval_records), eval_source),
                   kind, tokenizer, base_vocab, job_fp)
