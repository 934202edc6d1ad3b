"""Stage 4, finetune: one Ray Train + DeepSpeed job per model key, then a Hugging Face export.

`finetune_models(run, jobs, config)` trains every `FinetuneJob` with a `TorchTrainer`
running `train_loop.train_loop` on `num_workers` workers. Jobs run side by side while the
cluster has room for their workers and queue otherwise. Each finished key gets
`models/{folder}/` (the key's safe folder name, `RunDir.folder`): the best epoch (lowest eval loss) as a consolidated Hugging Face directory
(safetensors, config, tokenizer, generation config) and `manifest.json`, written last.

Resuming: a key whose manifest shows the same target, data and training options is not
trained again (one that differs is retrained, and the log says what changed). A key whose driver died
mid-training resumes from its last checkpoint when the same call runs again, because the
Ray Train run lives at `checkpoints/{folder}` (`RunConfig(storage_path, name=folder)`), and Ray
Train V2 restores a run found there. Workers that fail are restarted from the last
checkpoint (`FailureConfig(max_failures)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootfinetune.common.chat import ends_with_answer
from bootfinetune.config import RESOURCE_OPTIONS, TrainConfig
from bootfinetune.errors import FinetuneError
from bootfinetune.run.jsonio import fingerprint, read_json, read_jsonl, write_json
from bootfinetune.training.render import model_kind, renderer_identity
from bootfinetune.stages.representable import add_answer_tokens, fit_embeddings
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import ModelManifest
from bootfinetune.training.checkpoints import DS_DIR, STATE_FILE
from bootfinetune.training.train_loop import train_loop

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
    """Tokens added to the target's tokenizer so every answer survives it (`representable.plan_tokens`);
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
        ConfigError: before any training, an answer a target's tokenizer cannot write (see `representable`).
    """
    import ray

    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise FinetuneError(f"duplicate model keys {sorted(k for k in set(keys) if keys.count(k) > 1)}: one job per key.")
    jobs = decide_tokens(jobs, config)  # before Ray: an answer the tokenizer cannot write stops here
    from bootfinetune.runtime.ray_env import ensure_ray

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

    from bootfinetune.runtime.console import progress_drawer

    drawer = progress_drawer([j.key for j in pending]) if pending else None  # bars on a terminal, else lines
    progress = ({"progress_board": drawer.name, "progress_namespace": drawer.namespace} if drawer else {})
    need = worker_resources(config)
    budget = {k: float(v) for k, v in ray.available_resources().items()}
    errors: dict[str, BaseException] = {}
    running: dict[Future, FinetuneJob] = {}
    with contextlib.ExitStack() as stack, \
            ThreadPoolExecutor(max_workers=max(1, len(pending)), thread_name_prefix="finetune") as pool:
        if drawer is not None:
            stack.enter_context(drawer)
        while pending or running:
            # A job starts when its workers fit in what is left; one always may, when none runs.
            while pending and (not running or fits(need, budget)):
                job = pending.pop(0)
                budget = {k: v - need.get(k, 0.0) for k, v in budget.items()}
                job_hooks = {**progress, "progress_key": job.key, **(hooks or {}).get(job.key, {})}
                if tracking is not None and (spec := tracking.start(job.key, job.target, config)):
                    job_hooks["tracking"] = {**spec, "connection": ray.put(spec["connection"])}  # never in a file
                running[pool.submit(_run_job, run, job, config, job_hooks)] = job
            done_futures, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done_futures:
                job = running.pop(fut)
                budget = {k: v + need.get(k, 0.0) for k, v in budget.items()}
                try:
                    manifests[job.key] = fut.result()
                except BaseException as e:  # collected, raised below once every job has ended
                    errors[job.key] = e
                if tracking is not None:
                    tracking.end(job.key, ok=job.key not in errors)
    if errors:
        detail = "; ".join(f"{k!r}: {e}" for k, e in errors.items())
        raise FinetuneError(f"finetuning failed for model key(s) {sorted(errors)}: {detail}") from next(iter(errors.values()))
    return {k: manifests[k] for k in keys}


def decide_tokens(jobs: list[FinetuneJob], config: TrainConfig) -> list[FinetuneJob]:
    """The jobs with `added_tokens` decided, checking the data where the caller did not (layout comparison).

    Raises:
        ConfigError: an answer the target's tokenizer loses even with added tokens, or LoRA with added tokens.
    """
    from bootfinetune.stages.representable import check_lora, plan_for_files, raise_if_unfixable

    plans = {j.key: plan_for_files(j.key, j.target, [j.train_file, j.eval_file],
                                   trust_remote_code=config.trust_remote_code)
             for j in jobs if j.added_tokens is None}
    raise_if_unfixable(plans.values())
    decided = [dataclasses.replace(j, added_tokens=tuple(plans[j.key].added_tokens)) if j.key in plans else j
               for j in jobs]
    check_lora(decided, config.lora)  # the caller's tokens too (a retrain reuses the compile's)
    return decided


def worker_resources(config: TrainConfig) -> dict[str, float]:
    """Ray resources one job's workers hold together."""
    need = {"CPU": config.num_workers * config.cpus_per_worker}
    if config.use_gpu:
        need["GPU"] = config.num_workers * config.gpus_per_worker
    return need


def fits(need: dict[str, float], budget: dict[str, float]) -> bool:
    """Whether `need` fits in `budget` (resources not in the budget count as 0)."""
    return all(budget.get(k, 0.0) >= v - 1e-9 for k, v in need.items())


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


def _run_job(run: RunDir, job: FinetuneJob, config: TrainConfig, hooks: dict[str, Any]) -> ModelManifest:
    """Trains one key and exports it. Every failure comes out as a FinetuneError naming the key."""
    try:
        return _train_and_export(run, job, config, hooks)
    except FinetuneError:
        raise
    except Exception as e:
        raise FinetuneError(f"finetuning model {job.key!r} (target {job.target!r}) failed: "
                            f"{type(e).__name__}: {e}") from e


def _train_and_export(run: RunDir, job: FinetuneJob, config: TrainConfig, hooks: dict[str, Any]) -> ModelManifest:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoConfig, AutoTokenizer

    started = time.time()
    train_records, eval_records, eval_source = load_job_data(job, config)
    kind = model_kind(AutoConfig.from_pretrained(job.target, trust_remote_code=config.trust_remote_code))
    tokenizer = AutoTokenizer.from_pretrained(job.target, trust_remote_code=config.trust_remote_code)
    base_vocab = len(tokenizer)
    add_answer_tokens(tokenizer, job.added_tokens or ())

    job_fp = _job_fingerprint(job, config)
    experiment = run.checkpoint_dir(job.key)
    stamp = experiment / JOB_STAMP
    if stamp.exists() and read_json(stamp).get("job_fingerprint") != job_fp:
        log.warning("checkpoints in %s are from other data or options; starting %r over", experiment, job.key)
        run.remove_checkpoints(job.key)
    write_json(stamp, {"job_fingerprint": job_fp, "key": job.key, "target": job.target})
    run.sync()

    loop_config = {"target": job.target, "train": dataclasses.asdict(config), "ray": True,
                   "train_ref": ray.put(_rows(train_records)),
                   "eval_ref": ray.put(_rows(eval_records)) if eval_records else None,
                   "data_hash": data_hash(job.train_file), "added_tokens": list(job.added_tokens or ()), **hooks}
    storage_path, storage_fs = run.checkpoint_storage()  # on a cloud URI, workers write checkpoints there
    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if config.use_gpu else {})}
    keep = (CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="eval_loss", checkpoint_score_order="min")
            if eval_records else CheckpointConfig(num_to_keep=1))  # best + latest are kept (latest always is)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage_path, storage_filesystem=storage_fs, name=experiment.name,
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=keep),
    )
    fit_started = time.time()
    result = trainer.fit()
    fit_seconds = time.time() - fit_started
    if result.checkpoint is None:
        raise FinetuneError(f"finetuning model {job.key!r} reported no checkpoint; see {experiment}.")
    with result.checkpoint.as_directory() as latest:
        state = json.loads((Path(latest) / STATE_FILE).read_text())
    kept = {m["epoch"]: c for c, m in (result.best_checkpoints or []) if "epoch" in m}
    if not kept:
        raise FinetuneError(f"model {job.key!r}: Ray Train kept no epoch checkpoints in {experiment}.")
    best = _best_epoch([h for h in state["history"] if h["epoch"] in kept])  # Ray kept the best and the latest
    if best not in kept:
        raise FinetuneError(f"model {job.key!r}: no checkpoint of epoch {best} in {experiment}.")
    best_ckpt = kept[best]

    out = run.model_dir(job.key)
    staged = run.model_staging(job.key)  # the model in `out` (a retrain's) is kept until this one is complete
    export_started = time.time()
    with best_ckpt.as_directory() as ckpt_dir:
        lora = export_checkpoint(Path(ckpt_dir), best, job.target, kind, staged, trained_config(config, state),
                                 tokenizer=tokenizer, base_vocab=base_vocab)
    tokenizer.save_pretrained(staged)
    timings = _timings(state, fit_started, fit_seconds, time.time() - export_started)

    history = state["history"]
    manifest = ModelManifest(
        key=job.key,
        folder=out.name,
        target=job.target,
        predictors=list(job.predictors),
        model_kind=kind,
        renderer=renderer_identity(tokenizer, kind),
        data_file=str(job.train_file),
        data_hash=data_hash(job.train_file),
        eval_hash=data_hash(job.eval_file) if job.eval_file else None,
        train_records=len(train_records),
        eval_records=len(eval_records),
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
        wall_seconds=round(time.time() - started, 3),
        started_at=round(started, 3),
        finished_at=round(time.time(), 3),
        truncated={"train": state["truncated_train"], "eval": state["truncated_eval"],
                   "max_length": config.max_length,
                   # inference cuts a causal prompt to the room training left it beside a typical answer
                   "prompt_max_length": config.max_length - (state.get("answer_tokens_median", 0)
                                                              if kind == "causal" else 0)},
        answer_tokens_max=state.get("answer_tokens_max") or None,
        dropped_per_epoch=state["dropped_per_epoch"],
        world_size=state["world_size"],
        engine=state.get("engine") or {},
        timings=timings,
        nodes=state.get("nodes", []),
        starts=state["starts"],
        history=history,
        loss_curve=state.get("loss_curve", []),
        checkpoint=best_ckpt.path,
        train_config=dataclasses.asdict(config),
        lora=lora,
        added_tokens=list(job.added_tokens or ()),
        job_fingerprint=job_fp,
    )
    run.swap_model(manifest, staged)  # the manifest last (its presence means the key is finished), then in place
    run.sync()
    return manifest


def export_checkpoint(ckpt_dir: Path, epoch: int, target: str, kind: str, out: Path,
                      config: TrainConfig, *, tokenizer: Any = None, base_vocab: int | None = None) -> dict[str, Any] | None:
    """Consolidates a DeepSpeed checkpoint (any ZeRO stage) into a Hugging Face directory.

    The base model is loaded from `target` (for its config and generation config), the
    checkpoint's full fp32 weights replace its own, and `save_pretrained` writes safetensors
    (tied weights are stored once). bf16 training exports bf16 weights, else fp32.
    A LoRA run exports its adapter or the merged model instead (see `lora.export_lora`) and
    returns the adapter's facts for the manifest; a full finetune returns None.
    With `tokenizer` longer than `base_vocab` (tokens added for training), the base's
    embeddings are fitted to it first, as the training loop did.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    state_dict = consolidated_state_dict(ckpt_dir / DS_DIR, f"epoch_{epoch}", config.zero_stage)
    if config.lora:
        from bootfinetune.training.lora import export_lora

        try:
            return export_lora(state_dict, target, kind, out, config)
        except ValueError as exc:
            raise FinetuneError(f"checkpoint {ckpt_dir}: {exc}") from exc
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(target, dtype=torch.float32, use_safetensors=True,
                                 trust_remote_code=config.trust_remote_code)
    if tokenizer is not None and base_vocab is not None and len(tokenizer) > base_vocab:
        fit_embeddings(model, tokenizer, base_vocab)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = _tied_names(model)
    if unexpected or set(missing) - tied:
        raise FinetuneError(f"checkpoint {ckpt_dir} does not match {target}: missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}.")
    model.tie_weights()
    if config.bf16:
        model = model.to(torch.bfloat16)
    gen = model.generation_config
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else gen.eos_token_id
    model.save_pretrained(out)
    return None


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


def trained_config(config: TrainConfig, state: dict[str, Any]) -> TrainConfig:
    """The options with the engine the loop chose (`zero_stage="auto"` resolved), as the checkpoint was written."""
    engine = state.get("engine") or {}
    if not engine:
        return config
    return dataclasses.replace(config, zero_stage=engine["zero_stage"], offload_optimizer=engine["offload_optimizer"],
                               offload_params=engine["offload_params"])


def consolidated_state_dict(ds_dir: Path, tag: str, zero_stage: int) -> dict[str, Any]:
    """Full fp32 weights from a DeepSpeed checkpoint: ZeRO-1/2/3 partitions merged, or stage 0's module.

    Stage 0's file is read with `weights_only=True` (tensors and plain containers, no code). ZeRO-1/2/3
    merge through DeepSpeed's `zero_to_fp32`, which unpickles the partition files itself (`weights_only=False`),
    as DeepSpeed's own resume does: those checkpoints must come from a trusted writer (docs/failures.md, "Trust").
    """
    import torch

    if zero_stage == 0:
        states = torch.load(ds_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It prints a line per step of the merge, and a progress bar (stderr) over the partition files.
    with contextlib.redirect_stdout(io.StringIO()) as said, contextlib.redirect_stderr(said):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    log.debug("zero_to_fp32: %s", said.getvalue().strip())
    return state


def _tied_names(model: Any) -> set[str]:
    """Parameter names that share storage with another one (e.g. lm_head.weight tied to the embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            tied |= {name, seen[ptr]}
        else:
            seen[ptr] = name
    return tied


def _best_epoch(history: list[dict[str, Any]]) -> int:
    """The epoch (1-based) with the lowest eval loss; the last one when there is no eval data."""
    scored = [(h["eval_loss"], h["epoch"]) for h in history if h.get("eval_loss") is not None]
    return min(scored)[1] if scored else history[-1]["epoch"]


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
