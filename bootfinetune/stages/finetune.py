"""Stage 4, finetune: the models of a compile trained on Ray Train + DeepSpeed, then a Hugging Face export each.

`finetune_models(run, jobs, config)` trains every `FinetuneJob` on `num_workers` Ray Train workers. The
models share Ray Train runs: as many run side by side as the cluster has room for, and each run trains its
models one after another in one worker group (`train_runs`), so a compile pays Ray Train's start and the
workers' set-up once per run, not once per model. Each finished key gets `models/{folder}/` (the key's safe
folder name, `RunDir.folder`): the best epoch (lowest eval loss) as a consolidated Hugging Face directory
(safetensors, config, tokenizer, generation config; `export`) and `manifest.json`, written last.

Resuming: a key whose manifest shows the same target, data and training options is not trained again (one
that differs is retrained, and the log says what changed). Each key's checkpoints live in its own folder,
`checkpoints/{folder}/epoch_{NNN}` (the best epoch and the latest are kept), so a key whose driver died
mid-training resumes from its last checkpoint when the same call runs again, and a run that failed restarts
from it (`max_failures` times per key; a key given up does not stop the others).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootfinetune.common.chat import ends_with_answer
from bootfinetune.config import RESOURCE_OPTIONS, TrainConfig
from bootfinetune.errors import FinetuneError
from bootfinetune.common.redaction import redact_uri
from bootfinetune.run.jsonio import fingerprint, read_json, read_jsonl, write_json
from bootfinetune.training.render import model_kind, renderer_identity
from bootfinetune.stages.export import export_model, trained_config
from bootfinetune.training.answer_tokens import add_answer_tokens
from bootfinetune.stages.train_runs import Outcome, Trainee, train_in_lanes
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import ModelManifest
from bootfinetune.run import storage
from bootfinetune.training.checkpoints import best_epoch, epoch_name, whole_epochs
from bootfinetune.runtime.console import progress_drawer
from bootfinetune.runtime.ray_env import ensure_ray
from bootfinetune.stages.token_plan import check_lora, plan_for_files, raise_if_unfixable

log = logging.getLogger(__name__)

MANIFEST = ModelManifest.FILE
JOB_STAMP = "bootfinetune_job.json"
"""Inside checkpoints/{folder}: what the checkpoints there were trained on (a mismatch starts over)."""


@dataclass(frozen=True)
class FinetuneJob:
    """One model to finetune: a model key, its base model and its data."""

    key: str
    """Model key: "all" in multitask mode, else the predictor's name."""
    target: str
    """Base model: Hugging Face id or local directory."""
    predictors: tuple[str, ...]
    """Names of the predictors this model serves."""
    train_file: Path
    """data/{key}.jsonl: {"messages": [...], "predictor": name, "example_index": int} per line."""
    eval_file: Path | None = None
    """JSONL of the same shape from the valset; None holds out `eval_fraction` of train_file."""
    added_tokens: tuple[str, ...] | None = None
    """Tokens added to the target's tokenizer so every answer survives it (`token_plan.plan_tokens`);
    None: not decided yet, `finetune_models` checks the data itself."""


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
    import ray

    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise FinetuneError(f"duplicate model keys {sorted(k for k in set(keys) if keys.count(k) > 1)}: one job per key.")
    jobs = decide_tokens(jobs, config)  # before Ray: an answer the tokenizer cannot write stops here

    ensure_ray()  # the compiler connects first; a stage run alone joins or starts Ray the package's way
    manifests: dict[str, ModelManifest] = {}
    pending = []
    for job in jobs:
        done = finished_manifest(run, job, config)
        if done is not None:
            log.info("model %r is already finetuned (%s); not training it again", job.key, run.model_dir(job.key))
            manifests[job.key] = done
        else:
            pending.append(job)

    drawer = progress_drawer([j.key for j in pending]) if pending else None  # bars on a terminal, else lines
    progress = ({"progress_board": drawer.name, "progress_namespace": drawer.namespace} if drawer else {})
    errors: dict[str, BaseException] = {}
    staged: dict[str, _Staged] = {}
    with contextlib.ExitStack() as stack:
        if drawer is not None:
            stack.enter_context(drawer)
        for job in pending:
            job_hooks = {**progress, "progress_key": job.key, **(hooks or {}).get(job.key, {})}
            try:
                staged[job.key] = _stage(run, job, config, job_hooks)
            except Exception as e:  # this key only: the others still train
                errors[job.key] = _named(job, e)
        for key, s in staged.items():
            if tracking is not None and (spec := tracking.start(key, s.job.target, config)):
                s.trainee.loop_config["tracking"] = {**spec, "connection": ray.put(spec["connection"])}  # never in a file
        storage_path, storage_fs = run.checkpoint_storage()
        budget = {k: float(v) for k, v in ray.available_resources().items()}
        outcomes = train_in_lanes([s.trainee for s in staged.values()], config, storage_path, storage_fs, budget)
        for key, outcome in outcomes.items():
            try:
                if outcome.error is not None:
                    raise outcome.error
                manifests[key] = _export(run, staged[key], config, outcome)
            except Exception as e:  # collected, raised below once every job has ended
                errors[key] = _named(staged[key].job, e)
            if tracking is not None:
                tracking.end(key, ok=key not in errors)
    if errors:
        detail = "; ".join(f"{k!r}: {e}" for k, e in errors.items())
        raise FinetuneError(f"finetuning failed for model key(s) {sorted(errors)}: {detail}") from next(iter(errors.values()))
    return {k: manifests[k] for k in keys}


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


def data_hash(path: Path) -> str:
    """sha256 of a data file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def finished_manifest(run: RunDir, job: FinetuneJob, config: TrainConfig) -> ModelManifest | None:
    """The key's manifest if it was finished on the same data, target and options, else None."""
    manifest = run.read_manifest(job.key)
    if manifest is None:
        return None
    if manifest.job_fingerprint == _job_fingerprint(job, config):
        return manifest
    log.warning("models/%s retrained: %s", run.folder(job.key), "; ".join(retrain_reasons(manifest, job, config)))
    return None


def retrain_reasons(manifest: ModelManifest, job: FinetuneJob, config: TrainConfig) -> list[str]:
    """What differs between a finished model's manifest and the job now asked for, in words.

    Example: `["all.jsonl changed (now 44 records)", "lr 5e-05 -> 0.0001"]`.
    """
    reasons = []
    if manifest.target != job.target:
        reasons.append(f"target {manifest.target} -> {job.target}")
    if manifest.data_hash != data_hash(job.train_file):
        now = sum(1 for line in Path(job.train_file).read_text(encoding="utf-8").splitlines() if line.strip())
        reasons.append(f"{Path(job.train_file).name} changed (now {now} records)")
    if manifest.eval_hash != (data_hash(job.eval_file) if job.eval_file else None):
        reasons.append("eval data changed")
    old = manifest.train_config
    reasons += [f"{k} {old.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(config).items()
                if k not in _RESOURCE_ONLY and k in old and old[k] != v]
    return reasons or ["trained on other data or options"]


def split_records(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Holds out `fraction` of the records (at least one when fraction > 0 and there are 2+), seeded.

    Example:
        >>> train, held = split_records([{"i": i} for i in range(10)], 0.2, seed=0)
        >>> len(train), len(held), sorted(r["i"] for r in train + held) == list(range(10))
        (8, 2, True)
    """
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n = min(len(records) - 1, max(1, round(fraction * len(records))))
    held = set(order[:n])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# Resource options change where or how safely a job runs, not what it trains: a rerun that changes
# them keeps the finished model and the checkpoints. The config's target is left out too: the job's
# own target (one model key's) counts instead.
_RESOURCE_ONLY = RESOURCE_OPTIONS | {"target"}


def _job_fingerprint(job: FinetuneJob, config: TrainConfig) -> str:
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESOURCE_ONLY}
    eval_hash = data_hash(job.eval_file) if job.eval_file else None
    identity = {"target": job.target, "data": data_hash(job.train_file), "eval": eval_hash, "options": options}
    if job.added_tokens:  # only when there are some, so runs without keep their fingerprint
        identity["added_tokens"] = list(job.added_tokens)
    return fingerprint(identity)


@dataclass
class _Staged:
    """A key ready to train: what its workers get (`trainee`) and what its export needs."""

    job: FinetuneJob
    trainee: Trainee
    records: tuple[int, int, str]
    """Train records, eval records, and where eval came from."""
    kind: str
    tokenizer: Any
    """The target's tokenizer with the added tokens (exported beside the model)."""
    base_vocab: int
    job_fp: str


def _named(job: FinetuneJob, e: BaseException) -> FinetuneError:
    """Every failure of a key comes out as a FinetuneError naming it."""
    if isinstance(e, FinetuneError):
        return e
    error = FinetuneError(f"finetuning model {job.key!r} (target {job.target!r}) failed: {type(e).__name__}: {e}")
    error.__cause__ = e
    return error


def _stage(run: RunDir, job: FinetuneJob, config: TrainConfig, hooks: dict[str, Any]) -> _Staged:
    """Reads and checks a key's data, loads its tokenizer, clears checkpoints of other data or options, and
    puts its records in the object store for its workers."""
    import ray
    from transformers import AutoConfig, AutoTokenizer

    train_records, eval_records, eval_source = load_job_data(job, config)
    kind = model_kind(AutoConfig.from_pretrained(job.target, trust_remote_code=config.trust_remote_code))
    tokenizer = AutoTokenizer.from_pretrained(job.target, trust_remote_code=config.trust_remote_code)
    base_vocab = len(tokenizer)
    add_answer_tokens(tokenizer, job.added_tokens or ())

    job_fp = _job_fingerprint(job, config)
    stamp = run.checkpoint_dir(job.key) / JOB_STAMP
    if stamp.exists() and read_json(stamp).get("job_fingerprint") != job_fp:
        log.warning("checkpoints in %s are from other data or options; starting %r over", stamp.parent, job.key)
        run.remove_checkpoints(job.key)
    write_json(stamp, {"job_fingerprint": job_fp, "key": job.key, "target": job.target})
    run.push()
    place = run.checkpoint_location(job.key)  # on a cloud URI, the workers write the checkpoints there
    loop_config = {"target": job.target, "train": dataclasses.asdict(config), "ray": True,
                   "train_ref": ray.put(_rows(train_records)),
                   "eval_ref": ray.put(_rows(eval_records)) if eval_records else None, "checkpoint_dir": place,
                   "data_hash": data_hash(job.train_file), "added_tokens": list(job.added_tokens or ()), **hooks}
    return _Staged(job, Trainee(job.key, loop_config, place), (len(train_records), len(eval_records), eval_source),
                   kind, tokenizer, base_vocab, job_fp)


def _export(run: RunDir, staged: _Staged, config: TrainConfig, outcome: Outcome) -> ModelManifest:
    """The best kept epoch of a finished key as models/{folder}/, and its manifest (written last)."""
    job, state, place = staged.job, outcome.state or {}, staged.trainee.checkpoint_dir
    kept = set(whole_epochs(place))
    history = state["history"]
    best = best_epoch([h for h in history if h["epoch"] in kept] or history)
    if best not in kept:
        raise FinetuneError(f"model {job.key!r}: no checkpoint of epoch {best} in {redact_uri(place)}.")
    out = run.model_dir(job.key)
    export_started = time.time()
    lora, export_node, staged_export = export_model(run, job.key, place, best, target=job.target, kind=staged.kind,
                                     config=trained_config(config, state), tokenizer=staged.tokenizer,
                                     base_vocab=staged.base_vocab)
    timings = _timings(state, outcome.begin, outcome.end - outcome.begin, time.time() - export_started)
    train_n, eval_n, eval_source = staged.records
    manifest = ModelManifest(
        key=job.key,
        folder=out.name,
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
    if staged_export is not None:  # the manifest last (its presence means the key is finished), then in place
        run.swap_model(manifest, staged_export)
    else:
        run.write_manifest(manifest)
    run.push()
    return manifest


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


def load_job_data(job: FinetuneJob, config: TrainConfig) -> tuple[list[dict], list[dict], str]:
    """A job's train and eval records, checked, and where eval came from ("valset", "held_out" or "none")."""
    records = _checked_records(job.key, job.train_file)
    if job.eval_file is not None:
        return records, _checked_records(job.key, job.eval_file), "valset"
    train, held = split_records(records, config.eval_fraction, config.seed)
    return train, held, ("held_out" if held else "none")


def _checked_records(key: str, path: Path) -> list[dict]:
    if not Path(path).exists():
        raise FinetuneError(f"model {key!r}: data file {path} does not exist; run the datasets stage first.")
    records = read_jsonl(path)
    if not records:
        raise FinetuneError(f"model {key!r}: data file {path} has no records; bootstrapping kept no traces.")
    for i, r in enumerate(records):
        messages = r.get("messages")
        if not (isinstance(messages, list) and ends_with_answer(messages)):
            raise FinetuneError(f"model {key!r}: {path} line {i + 1} needs 'messages' ending with an assistant turn.")
    return records


def _rows(records: list[dict]) -> list[dict]:
    """The records as the workers read them: messages with their position, so every rank sorts alike."""
    return [{"messages": r["messages"], "row": i} for i, r in enumerate(records)]
