"""The per-worker training loop: one plain function, under Ray Train or without Ray.

`train_loop(loop_config)` finetunes `target` with DeepSpeed (or, on one worker with nothing to shard,
the plain torch engine: `torch_engine`) on the records it is given:

- under Ray Train (`loop_config["ray"] = True`, what `model_queue.train_models` runs for each model of a
  `TorchTrainer` run): rows come from the object store (`train_ref` / `eval_ref`: the records the driver put
  there once, each rank taking its slice, as without Ray), and every rank calls `ray.train.report(metrics)`
  once per epoch;
- without Ray (`torchrun` or one plain process, e.g. for benchmarks on a GPU machine that has no
  Ray): rows come from the JSONL files `train_path` / `eval_path`.

`ray` is imported only in the first case. Either way, per-epoch checkpoints go to `checkpoint_dir` (a folder,
or a cloud URI) when one is given, and a (re)start resumes from the newest whole one there at the next epoch
(`checkpoints`: `deepspeed/`, a resumable DeepSpeed checkpoint tagged `epoch_{n}`, and `trainer_state.json`:
epochs done, per-epoch losses, tokens, seconds, where each start resumed from).

Each (re)start runs `_rank_data` (tokenizer, this rank's encoded data, step counts), then
`engine.build_engine` (model, LoRA, optimizer, DeepSpeed or the plain engine), then per epoch `_train_epoch`
(the steps) and `_finish_epoch` (evaluation, history, checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from bootfinetune.config import TrainConfig
from bootfinetune.training.distributed import all_reduce, process_group, rank_nodes, set_threads
from bootfinetune.training.answer_head import answer_positions
from bootfinetune.run.jsonio import read_jsonl
from bootfinetune.training.render import IGNORE_INDEX, Encoded, answer_token_counts, collate, encode_records, model_kind
from bootfinetune.training.packing import micro_batch, packs_exactly
from bootfinetune.training.answer_tokens import add_answer_tokens
from bootfinetune.training.engine import build_engine, deepspeed_config, zero3_loading
from bootfinetune.training.engine_choice import micro_sizes, resolve_engine
from bootfinetune.training.tracking import open_tracker
from bootfinetune.training.progress import PhaseClock, Reporter
from bootfinetune.training.checkpoints import DS_DIR, STATE_FILE, latest_state, local_copy, report, save_checkpoint  # noqa: F401

log = logging.getLogger(__name__)

BUCKET_FACTOR = 16
"""Micro batches per length bucket: examples are sorted by length within buckets this big."""


@dataclass(frozen=True)
class StepInfo:
    """Where a worker is, as `LoopConfig.on_step` sees it after each micro batch."""

    epoch: int
    """The epoch, from 0."""
    step: int
    """The micro batch within the epoch, from 0."""
    micro_batches: int
    """Micro batches per epoch (the same on every rank)."""
    start_epoch: int
    """The epoch this (re)start of the loop began at (0 = from scratch)."""
    rank: int
    world: int


@dataclass
class LoopConfig:
    """What one worker needs. Plain values (and a picklable `on_step`): it travels to every Ray Train worker."""

    target: str
    """Model id or local directory to start from."""
    train: dict[str, Any]
    """TrainConfig fields (`dataclasses.asdict(TrainConfig(...))`)."""
    ray: bool = False
    """Running under Ray Train: data from the object store, checkpoints through `ray.train.report`."""
    train_ref: Any = None
    """Under Ray: an ObjectRef of the training records (what `train_path` holds), put there by the driver."""
    eval_ref: Any = None
    """Under Ray: an ObjectRef of the eval records, or None."""
    train_path: str | None = None
    """Without Ray: JSONL of training records ({"messages": [...]} per line)."""
    eval_path: str | None = None
    """Without Ray: JSONL of eval records (optional)."""
    checkpoint_dir: str | None = None
    """Folder or cloud URI for per-epoch checkpoints (epoch_{NNN}/), resumed from if present; None: none kept."""
    data_hash: str | None = None
    """Hash of the training data, recorded in the state to catch a resume onto other data."""
    added_tokens: list[str] = field(default_factory=list)
    """Tokens added to the target's tokenizer so that every answer survives it (see `training.answer_tokens`)."""
    max_steps_per_epoch: int | None = None
    """Cap on micro batches per epoch (benchmarks)."""
    progress_board: str | None = None
    """Under Ray: name of the driver's `progress.ProgressBoard` actor that rank 0 reports steps to."""
    progress_namespace: str | None = None
    """Ray namespace of that actor."""
    progress_key: str = "model"
    """The model key shown beside the progress."""
    tracking: dict[str, Any] | None = None
    """The MLflow run rank 0 logs into: {"run_id", "connection"} (under Ray an ObjectRef); see `tracking`."""
    on_step: Callable[[StepInfo], None] | None = None
    """Called on every rank after each micro batch (instrumentation, fault injection: see
    `testing.FailOnce`); it must pickle, since it travels to every worker."""
    time_phases: bool = False
    """Time each micro batch's forward, backward and optimizer step (with a device sync around each on a
    GPU, which slows the steps: off by default); each epoch's history then has `phase_seconds`."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown loop_config keys {unknown}; known: {sorted(known)}.")
        return cls(**d)


@dataclass
class LoopState:
    """Progress carried in every checkpoint; a resumed run continues it."""

    epochs_done: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per finished epoch: epoch (1-based), train_loss, eval_loss, tokens, seconds..."""
    starts: list[dict[str, int]] = field(default_factory=list)
    """Where each (re)start of the loop began: {"epoch", "global_step"} (0 = from scratch)."""
    eval_loss_before: float | None = None
    nodes: list[str] = field(default_factory=list)
    """Where each rank of the latest start ran: Ray node ids (host names outside Ray), by rank."""
    truncated_train: int = 0
    truncated_eval: int = 0
    dropped_per_epoch: int = 0
    answer_tokens_median: int = 0
    """Median answer length (tokens with labels) in rank 0's training records: inference cuts
    causal prompts to max_length minus this, the room training left them."""
    answer_tokens_max: int = 0
    """Longest answer (tokens with labels) in any rank's training records: the serving ceiling's base."""
    loss_curve: list[list[float]] = field(default_factory=list)
    """[optimizer step, mean train loss since the previous point] on rank 0, about 100 points a run."""
    kind: str = ""
    answer_logits_only: bool = False
    """Whether the head ran on answer positions only (see `answer_logits_only`)."""
    world_size: int = 1
    engine: dict[str, Any] = field(default_factory=dict)
    """The engine (plain torch or DeepSpeed's ZeRO stage and offload) trained with, and why (`engine_choice.EngineChoice`)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Fixed cost around the steps: loop_started_at (Unix time the latest start entered the loop),
    setup_seconds (its data, model and DeepSpeed set-up), checkpoint_seconds (the checkpoints written before
    the one holding this state: a checkpoint's own time is known only after it is written), eval_seconds (the
    eval passes, over all starts), reported_at (Unix time the newest checkpoint began to be written)."""
    data_hash: str | None = None
    seconds: float = 0.0


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Finetunes `loop_config["target"]`; see the module docstring.

    Args:
        loop_config: `LoopConfig` fields as a dict.

    Returns:
        The final `LoopState` as a dict on rank 0 (None elsewhere).
    """
    import torch

    cfg = LoopConfig.from_dict(loop_config)
    tc = TrainConfig(**cfg.train)
    threads = torch.get_num_threads()
    set_threads()
    try:
        with process_group(ray=cfg.ray, use_gpu=tc.use_gpu) as (rank, world, device):
            return _train(cfg, tc, rank, world, device)
    finally:
        torch.set_num_threads(threads)  # a caller's process (one-process mode) gets its setting back


@dataclass
class RankData:
    """What one (re)start of the loop prepares before the model: tokenizer, this rank's data, step counts."""

    kind: str
    """"causal" or "seq2seq"."""
    tokenizer: Any
    base_vocab: int
    """The tokenizer's size before the added tokens."""
    train_ex: list[Encoded]
    eval_ex: list[Encoded]
    n_eval: int
    """Eval examples over all ranks."""
    n_micro: int
    """Micro batches per epoch, the same on every rank."""
    steps_per_epoch: int
    total_steps: int
    pad_id: int
    multiple: int | None
    """Batches are padded to a multiple of this (on a GPU)."""
    packed: bool = False
    """Each micro batch's records are packed into rows (`packing`, a causal model that `packs_exactly`)."""


def _train(cfg: LoopConfig, tc: TrainConfig, rank: int, world: int, device: Any) -> dict[str, Any] | None:
    started = time.time()
    resume_epoch, saved = latest_state(cfg.checkpoint_dir)
    state = LoopState(**saved) if saved else LoopState()
    if state.epochs_done >= tc.epochs:
        return asdict(state) if rank == 0 else None
    if state.data_hash and cfg.data_hash and state.data_hash != cfg.data_hash:
        raise RuntimeError(f"checkpoint {resume_epoch} in {cfg.checkpoint_dir} was trained on other data "
                           f"({state.data_hash} != {cfg.data_hash}); delete it to start over.")
    state.starts.append({"epoch": state.epochs_done, "global_step": state.global_step})
    state.world_size, state.data_hash = world, cfg.data_hash
    state.nodes = rank_nodes(world)

    seed_everything(tc.seed)
    data = _rank_data(cfg, tc, state, rank, world, device)
    # packed micro batches are never larger than padded ones: the unpacked sizes bound them
    micro = micro_sizes([len(e.input_ids) for e in data.train_ex], [sum(t != IGNORE_INDEX for t in e.labels)
                        for e in data.train_ex], tc.bsize, tc.answer_logits_only or data.kind == "seq2seq")
    micro = tuple(int(v) for v in all_reduce(list(micro), device, "max"))
    choice = resolve_engine(cfg.target, data.kind, tc, rank, world, state.nodes, device, state.engine or None, micro)
    tc = replace(tc, zero_stage=choice.zero_stage, offload_optimizer=choice.offload_optimizer,
                 offload_params=choice.offload_params, gradient_checkpointing=choice.gradient_checkpointing)
    ds_config = deepspeed_config(tc, world) if choice.engine == "deepspeed" else None
    with zero3_loading(ds_config, tc):
        engine, head_only = build_engine(cfg.target, tc, data.kind, data.tokenizer, data.base_vocab,
                                         cfg.added_tokens, data.total_steps, ds_config, device)
        if head_only is not None:
            state.answer_logits_only = head_only
        # seq2seq has no packed attention, nor has a model with its own mask code: a record a row
        data.packed = tc.packing and data.kind == "causal" and packs_exactly(engine.module)
        state.engine = {**choice.to_json(), "packed": data.packed}
        if resume_epoch is not None:  # DeepSpeed unpickles its files (weights_only=False): a trusted run only
            with tempfile.TemporaryDirectory(prefix="bootfinetune-resume-") as scratch:
                resume_dir = local_copy(str(cfg.checkpoint_dir), resume_epoch, Path(scratch))
                engine.load_checkpoint(str(resume_dir / DS_DIR), tag=f"epoch_{state.epochs_done}")
        state.timings.update(loop_started_at=round(started, 3), setup_seconds=round(time.time() - started, 3))
        state.timings.setdefault("checkpoint_seconds", 0.0)
        if rank == 0:
            log.info("%s %s: %d train / %d eval records per rank, %d micro batches per epoch, start epoch %d; "
                     "engine %s", data.kind, cfg.target, len(data.train_ex), len(data.eval_ex), data.n_micro,
                     state.epochs_done + 1, choice.describe())
        reporter = None
        if rank == 0:
            reporter = Reporter(cfg.progress_board if cfg.ray else None, cfg.progress_key, cfg.progress_namespace)
        tracker = open_tracker(cfg.tracking, state, rank)  # rank 0 only, when the driver made an MLflow run
        if state.epochs_done == 0 and state.eval_loss_before is None and data.n_eval:
            state.eval_loss_before = _evaluate(engine, data, tc, device, state)
        for epoch in range(state.epochs_done, tc.epochs):
            sums = _train_epoch(cfg, tc, engine, data, state, epoch, reporter, rank, world, device, tracker)
            _finish_epoch(cfg, tc, engine, data, state, epoch, sums, rank, world, device)
            if tracker is not None:
                tracker.update(state, force=True)
        return asdict(state) if rank == 0 else None


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (every device's), as `transformers.set_seed` does; not that
    one, whose module imports the Trainer's (and PEFT with them: seconds in every worker)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rank_data(cfg: LoopConfig, tc: TrainConfig, state: LoopState, rank: int, world: int, device: Any) -> RankData:
    """Loads the tokenizer and this rank's rows, encodes them, and agrees with the other ranks on the steps."""
    from transformers import AutoConfig, AutoTokenizer

    load_kw = dict(trust_remote_code=tc.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(cfg.target, **load_kw)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_vocab = len(tokenizer)
    add_answer_tokens(tokenizer, cfg.added_tokens)
    kind = model_kind(AutoConfig.from_pretrained(cfg.target, **load_kw))
    state.kind = kind

    train_rows, eval_rows = _load_rows(cfg, rank, world)
    train_ex, trunc_train = encode_records(tokenizer, train_rows, kind, tc.max_length)
    eval_ex, trunc_eval = encode_records(tokenizer, eval_rows, kind, tc.max_length)
    state.truncated_train, state.truncated_eval, n_eval = (
        int(x) for x in all_reduce([trunc_train, trunc_eval, len(eval_ex)], device, "sum"))
    if not train_ex:
        raise RuntimeError(f"rank {rank} got no training records; give more data or fewer workers.")
    answer_lengths = answer_token_counts(train_ex)
    state.answer_tokens_median = answer_lengths[len(answer_lengths) // 2]
    state.answer_tokens_max = int(all_reduce([answer_lengths[-1]], device, "max")[0])

    # Every rank must run the same number of steps (collectives would hang otherwise).
    n_micro = int(all_reduce([math.ceil(len(train_ex) / tc.bsize)], device, "min")[0])
    if cfg.max_steps_per_epoch:
        n_micro = min(n_micro, cfg.max_steps_per_epoch)
    if n_micro >= tc.accumsteps:  # whole accumulation groups only, so an epoch ends on an optimizer step
        n_micro -= n_micro % tc.accumsteps
    steps_per_epoch = max(1, n_micro // tc.accumsteps)
    return RankData(kind=kind, tokenizer=tokenizer, base_vocab=base_vocab, train_ex=train_ex, eval_ex=eval_ex,
                    n_eval=n_eval, n_micro=n_micro, steps_per_epoch=steps_per_epoch,
                    total_steps=steps_per_epoch * tc.epochs, pad_id=tokenizer.pad_token_id,
                    multiple=8 if tc.use_gpu else None)


def _train_epoch(cfg: LoopConfig, tc: TrainConfig, engine: Any, data: RankData, state: LoopState, epoch: int,
                 reporter: Any, rank: int, world: int, device: Any,
                 tracker: Any = None) -> tuple[Any, int, int, int, float, Any]:
    """One epoch's micro batches. Returns this rank's loss sum, answer tokens, tokens, padding, seconds and
    (with `time_phases`) seconds per phase."""
    import torch

    t0 = time.time()
    engine.train()
    kind, n_micro, train_ex = data.kind, data.n_micro, data.train_ex
    curve_every = max(1, data.total_steps // 100)
    batches = length_batches([len(e.input_ids) for e in train_ex], tc.bsize, tc.seed + epoch)
    state.dropped_per_epoch = sum(len(b) for b in batches[n_micro:])
    loss_sum, answer_toks, toks, padded = torch.zeros((), device=device), 0, 0, 0
    window, window_n = torch.zeros((), device=device), 0
    clock = PhaseClock(device) if cfg.time_phases else None
    for i, idx in enumerate(batches[:n_micro]):
        batch, real = micro_batch([train_ex[j] for j in idx], data.pad_id, data.multiple, data.packed)
        answers = int((batch["labels"] != -100).sum())
        answer_toks += answers
        toks += real + (answers if kind == "seq2seq" else 0)  # seq2seq: encoder + decoder tokens
        padded += batch["input_ids"].numel() - real
        inputs = to_device(batch, device, state.answer_logits_only)
        clock and clock.lap(None)
        loss = engine(**inputs).loss
        clock and clock.lap("forward")
        engine.backward(loss)
        clock and clock.lap("backward")
        engine.step()
        clock and clock.lap("optimizer")
        loss_sum += loss.detach().float()  # no host sync per step
        window += loss.detach().float()
        window_n += 1
        if reporter is not None and (i + 1) % tc.accumsteps == 0:
            step = engine.global_steps
            on_curve = step % curve_every == 0
            if on_curve or reporter.due():  # the host sync happens only here
                mean = float(window) / window_n
                if on_curve:  # a curve point is the mean of its steps alone, whenever progress was reported
                    window, window_n = torch.zeros((), device=device), 0
                    state.loss_curve.append([step, round(mean, 5)])
                    if tracker is not None:
                        tracker.update(state)
                reporter.report(step, data.total_steps, mean, epoch + 1, tc.epochs, force=on_curve)
        if cfg.on_step is not None:
            cfg.on_step(StepInfo(epoch, i, n_micro, state.starts[-1]["epoch"], rank, world))
    phases = {k: round(v, 4) for k, v in clock.seconds.items()} if clock else None
    return loss_sum, answer_toks, toks, padded, time.time() - t0, phases


def _finish_epoch(cfg: LoopConfig, tc: TrainConfig, engine: Any, data: RankData, state: LoopState, epoch: int,
                  sums: tuple[Any, int, int, int, float, Any], rank: int, world: int, device: Any) -> None:
    """Evaluates, records the epoch in the state (summed over ranks), and writes and reports the checkpoint."""
    t0 = time.time()
    loss_sum, answer_toks, toks, padded, train_seconds, phases = sums
    mean_loss, answer_toks, toks, padded = all_reduce(
        [float(loss_sum) / max(1, data.n_micro), answer_toks, toks, padded], device, "sum")
    eval_loss = _evaluate(engine, data, tc, device, state) if data.n_eval else None
    state.epochs_done, state.global_step = epoch + 1, engine.global_steps
    state.history.append({
        "epoch": epoch + 1, "train_loss": mean_loss / world, "eval_loss": eval_loss,
        "answer_tokens": int(answer_toks), "tokens": int(toks), "padded_tokens": int(padded),
        "steps": data.steps_per_epoch, "train_seconds": round(train_seconds, 3),
        "tokens_per_second": round(toks / max(train_seconds, 1e-9), 1),
        "lr": float(engine.get_lr()[0]),
        **({"phase_seconds": phases} if phases else {}),
    })
    state.seconds += train_seconds + time.time() - t0
    if rank == 0:
        log.info("epoch %d: train loss %.4f eval loss %s, %.0f tokens/s", epoch + 1, mean_loss / world,
                 eval_loss, toks / max(train_seconds, 1e-9))
    metrics = {"epoch": epoch + 1, "global_step": state.global_step, "train_loss": mean_loss / world,
               "eval_loss": eval_loss, "start_epoch": state.starts[-1]["epoch"]}
    state.timings["reported_at"] = round(time.time(), 3)  # the last one: where the driver's wait for Ray begins
    seconds = save_checkpoint(cfg.checkpoint_dir, engine, asdict(state), epoch + 1, rank) if cfg.checkpoint_dir else 0.0
    if cfg.ray:
        report(metrics)
    state.timings["checkpoint_seconds"] = round(state.timings.get("checkpoint_seconds", 0.0) + seconds, 3)


def _evaluate(engine: Any, data: RankData, tc: TrainConfig, device: Any, state: LoopState) -> float:
    """`evaluate` on this start's eval examples; its seconds go to `timings["eval_seconds"]`."""
    t0 = time.time()
    loss = evaluate(engine, data.eval_ex, data.train_ex, tc, data.pad_id, data.multiple, device, data.kind,
                    state.answer_logits_only)
    state.timings["eval_seconds"] = round(state.timings.get("eval_seconds", 0.0) + time.time() - t0, 3)
    return loss


def to_device(batch: dict[str, Any], device: Any, answer_index: bool) -> dict[str, Any]:
    """The batch on the device, without a device sync: on a GPU, host tensors are pinned and copied
    asynchronously (a copy from pageable memory waits for the queued kernels, which would leave the
    GPU idle while Python prepares the next step). `answer_index` adds the answer positions,
    computed on the host, for the answer-only head."""
    if answer_index:
        batch = {**batch, "answer_index": answer_positions(batch["labels"])}
    if getattr(device, "type", str(device)) != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def length_batches(lengths: list[int], bsize: int, seed: int, bucket_factor: int = BUCKET_FACTOR) -> list[list[int]]:
    """Micro batches of indices that group similar lengths, in a seeded random order.

    Indices are shuffled, cut into buckets of `bsize * bucket_factor`, sorted by length
    within each bucket, cut into micro batches, and the batches shuffled.

    Example:
        >>> sorted(sorted(b) for b in length_batches([9, 1, 8, 2], bsize=2, seed=0))
        [[0, 2], [1, 3]]
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = bsize * bucket_factor
    batches = []
    for start in range(0, len(order), size):
        bucket = sorted(order[start:start + size], key=lambda i: lengths[i])
        batches += [bucket[i:i + bsize] for i in range(0, len(bucket), bsize)]
    rng.shuffle(batches)
    return batches


def evaluate(engine: Any, eval_ex: list[Encoded], train_ex: list[Encoded], tc: TrainConfig, pad_id: int,
             multiple: int | None, device: Any, kind: str, answer_index: bool = False) -> float:
    """Mean loss per answer token over every rank's eval examples.

    Batches of 2 x bsize records sorted by length (with no gradients a forward's largest tensor is its logits,
    which a training step holds twice). Ranks may hold different numbers of eval batches; under ZeRO-3 a forward
    is a collective, so short ranks run weight-0 batches until all have done the same count.
    """
    import torch

    engine.eval()
    order = sorted(range(len(eval_ex)), key=lambda i: len(eval_ex[i].input_ids))
    batches = [order[i:i + 2 * tc.bsize] for i in range(0, len(order), 2 * tc.bsize)]
    n = int(all_reduce([len(batches)], device, "max")[0])
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(n):
            real = b < len(batches)
            examples = [eval_ex[j] for j in batches[b]] if real else [(eval_ex or train_ex)[0]]
            batch = collate(examples, pad_id, multiple)
            labels = batch["labels"][:, 1:] if kind == "causal" else batch["labels"]
            tokens = int((labels != -100).sum())
            loss = engine(**to_device(batch, device, answer_index)).loss
            if real:
                total, count = total + float(loss) * tokens, count + tokens
    engine.train()
    total, count = all_reduce([total, count], device, "sum")
    return total / max(count, 1)


def _load_rows(cfg: LoopConfig, rank: int, world: int) -> tuple[list[dict], list[dict]]:
    """This rank's train rows and eval rows, in a fixed order (by the `row` column when present)."""
    if cfg.ray:
        # The records are small next to the model (chat text), so every rank reads them whole from the
        # object store and takes its slice: no Ray Data pipeline (a coordinator actor and two executions
        # per training, seconds of start-up) for rows the loop holds in memory anyway.
        import ray

        if cfg.train_ref is None:
            raise ValueError("train_ref: under Ray the driver passes the training records' ObjectRef.")
        train = _normalise(ray.get(cfg.train_ref))
        evals = _normalise(ray.get(cfg.eval_ref)) if cfg.eval_ref is not None else []
        return train[rank::world], evals[rank::world]
    if not cfg.train_path:
        raise ValueError("train_path: give a JSONL of training records when running without Ray.")
    train = _normalise(read_jsonl(Path(cfg.train_path)))
    evals = _normalise(read_jsonl(Path(cfg.eval_path))) if cfg.eval_path else []
    return train[rank::world], evals[rank::world]


def _normalise(rows: list[dict]) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        messages = r["messages"]
        if isinstance(messages, str):  # the driver ships messages as JSON text (robust through Arrow)
            messages = json.loads(messages)
        out.append({"messages": messages, "row": int(r.get("row", i))})
    return sorted(out, key=lambda r: r["row"])

