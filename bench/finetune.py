"""Training throughput: bootfinetune's loop against TRL's `SFTTrainer` and the Hugging Face `Trainer`.

    python bench/finetune.py                                          # CPU: a small Llama, fp32, DSPy-shaped records
    python bench/finetune.py --size 0.5b 1.5b --seq-len 1024 --bf16   # one GPU (bf16)

Every engine trains the same causal model (random weights from a config, saved once and
loaded with `from_pretrained`), on the same token ids, tokenized once by bootfinetune's renderer
(loss on the answer only). The records are DSPy-shaped: prompts of 100 to 400 tokens and answers
of 5 to 60 (`--prompt-tokens`, `--answer-tokens`), drawn once (seeded) and shared by every engine.
Same records per epoch, micro batch, accumulation, learning rate, AdamW, precision and number of
epochs; each engine runs in its own process, one at a time.

- `ours`: `bootfinetune.training.train_loop` with its defaults (length buckets, the micro batch's
  records packed into rows, LM head on answer positions).
- `ours-nopack`: the same with `packing=False` (one padded record a row); `ours-pack`: `packing=True`.
- `ours-fullhead`: `answer_logits_only=False` (the head on every position).
- `ours-compile`: `compile_layers=True` (`torch.compile` of each decoder layer; tokens/s from the last epoch,
  so after the one-time compile, whose cost shows in `wall_seconds`).
- `hf-group`: `transformers.Trainer` with its length-grouped sampler, padding per batch.
- `hf-packed`: `transformers.Trainer` with `DataCollatorWithFlattening` (the micro batch's records in one
  row, position ids restarting per record: the Trainer's own padding-free packing).
- `trl`: `trl.SFTTrainer` as DSPy's local finetuning sets it up: `packing=True` (rows of `--seq-len`
  tokens, best-fit, padding-free), completion-only loss.

tokens/s counts real (non-padding) tokens, over the last epoch (the first holds warm-up); the HF
Trainer's ratio uses the faster of its two set-ups. The step time is split into forward, backward and
optimizer (measured around those calls: for ours by the loop's `time_phases` timers; for the Trainers
by wrapping the model's forward and `accelerator.backward`, and gradient clipping plus the optimizer
step between the callbacks around it), and "data": the rest of the epoch (batches, collation, the
scheduler, logging), all summed over the last epoch and divided by its micro batches. On a shared machine
the wall time follows the load; each engine also gives its process's CPU seconds over the last epoch
(`tokens_per_cpu_second`), which follow it much less, and the ratios in those.
MFU (GPU) = model FLOPs per token x tokens/s / peak bf16 (989 TFLOP/s for an H100 SXM):
FLOPs per token = 6 x (non-embedding parameters) + 6 x layers x hidden x mean context
(causal attention) + 6 x vocab x hidden x (share of positions the loss needs: answers).
It is the same formula for every engine; an engine that runs the head everywhere does
that work on top. The last line: `<size>: ours N tokens/s; ours/hf X.XXx, ours/trl Y.YYx`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from train_standalone import SIZES, synthetic_records  # noqa: E402  (also registers bootfinetune lightly)

SIZES = {
    **SIZES,
    # Qwen2.5-1.5B's shape with an untied output head: 1.78B parameters.
    "1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                 vocab_size=151936),
    # A small Llama for CPU runs.
    "small": dict(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=688, vocab_size=8192),
}
ENGINES = ("ours", "ours-nopack", "ours-pack", "ours-fullhead", "ours-compile", "hf-group", "hf-packed", "trl")
DEFAULT_ENGINES = ("ours", "ours-nopack", "hf-group", "hf-packed", "trl")
H100_BF16_PEAK = 989e12
PHASES = ("data", "forward", "backward", "optimizer")


def dspy_records(tokenizer, n: int, prompt_tokens: tuple[int, int], answer_tokens: tuple[int, int],
                 seed: int) -> list[dict]:
    """Chat records shaped like DSPy's: a prompt of `prompt_tokens` and an answer of `answer_tokens` tokens
    (uniform in each range, counted as the encoded prompt and the answer's labels), in DSPy's field markers."""
    from bootfinetune.training.render import encode_records

    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "ocean", "pixel", "amber", "the",
             "question", "of", "answer", "Paris", "capital", "which", "is", "a", "city"]
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}

    def text(budget: int) -> str:  # words whose tokens add up to about `budget` (byte-level BPE: a word alone)
        out = []
        while budget > 0:
            w = rng.choice(words)
            out.append(w)
            budget -= cost[w]
        return " ".join(out)

    def record(q: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": f"[[ ## question ## ]]\n{q}\n\nRespond with the answer."},
                             {"role": "assistant", "content": f"[[ ## answer ## ]]\n{a}\n\n[[ ## completed ## ]]"}]}

    # the template's own tokens around the drawn text
    (empty,), _ = encode_records(tokenizer, [record("", "")], "causal", 10_000)
    base_answer = sum(1 for t in empty.labels if t != -100)
    base_prompt = len(empty.input_ids) - base_answer
    rows = []
    for i in range(n):
        p, a = rng.randint(*prompt_tokens), rng.randint(*answer_tokens)
        rows.append({**record(text(p - base_prompt), text(a - base_answer)), "predictor": "qa", "example_index": i})
    return rows


def prepare(args) -> tuple[Path, Path, dict]:
    """Builds the model once and tokenizes the records once; returns (model dir, encoded data, stats)."""
    from bootfinetune.run.jsonio import write_jsonl
    from bootfinetune.training.render import encode_records
    from bootfinetune.testing.tiny_models import build_tiny_causal
    from transformers import AutoTokenizer

    work = Path(args.workdir)
    model_dir = build_tiny_causal(work / f"model-{args.size}", chat_template=False, max_positions=args.seq_len,
                                  **SIZES[args.size])
    n = args.bsize * args.accumsteps * args.steps
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.synthetic:
        records = synthetic_records(n, args.seq_len, seed=0)
    else:
        records = dspy_records(tokenizer, n, tuple(args.prompt_tokens), tuple(args.answer_tokens), seed=0)
    write_jsonl(work / "records.jsonl", records)
    encoded, truncated = encode_records(tokenizer, records, "causal", args.seq_len)
    if truncated:
        raise SystemExit(f"{truncated} records are longer than --seq-len {args.seq_len}; raise it.")
    data = work / f"encoded-{args.size}-{args.seq_len}.jsonl"
    write_jsonl(data, ({"input_ids": e.input_ids, "labels": e.labels} for e in encoded))
    lengths = [len(e.input_ids) for e in encoded]
    answer_lengths = [sum(1 for t in e.labels if t != -100) for e in encoded]
    prompts = [x - a for x, a in zip(lengths, answer_lengths)]
    return model_dir, data, {"records": n, "tokens": sum(lengths), "answer_tokens": sum(answer_lengths),
                             "prompt_range": [min(prompts), max(prompts)],
                             "answer_range": [min(answer_lengths), max(answer_lengths)],
                             "mean_length": sum(lengths) / n, "max_length": max(lengths),
                             "token_weighted_length": sum(x * x for x in lengths) / sum(lengths)}


def flops_per_token(model_dir: Path, stats: dict) -> float:
    cfg = json.loads((model_dir / "config.json").read_text())
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = h // heads
    attn = h * (h + 2 * kv * head_dim) + h * h
    mlp = 3 * h * cfg["intermediate_size"]
    body = layers * (attn + mlp)
    answer_share = stats["answer_tokens"] / stats["tokens"]
    # Causal attention: a token at position t costs 4·h·t forward (QK^T and AV), 12·h·t in training;
    # averaged over the tokens of the data that is 6·h·(token-weighted sequence length) per layer.
    return 6 * body + 6 * layers * h * stats["token_weighted_length"] + 6 * vocab * h * answer_share


def split(epoch_seconds: float, phases: dict, micro_batches: int) -> dict:
    """Milliseconds per micro batch in each phase; "data" is the epoch's time outside the three timed ones."""
    out = {k: phases.get(k, 0.0) for k in PHASES[1:]}
    out["data"] = max(0.0, epoch_seconds - sum(out.values()))
    return {f"{k}_ms": round(1000 * out[k] / max(1, micro_batches), 1) for k in PHASES}


# ----------------------------------------------------------------------------------------- engines


def run_ours(args, model_dir: Path, data: Path, engine: str) -> dict:
    import dataclasses

    import torch

    from bootfinetune.config import TrainConfig
    from bootfinetune.run.jsonio import iter_jsonl, write_jsonl
    from bootfinetune.training.train_loop import train_loop

    # The loop reads chat records; the same ones the others get as token ids.
    records = Path(args.workdir) / "records.jsonl"
    assert sum(1 for _ in iter_jsonl(records)) == sum(1 for _ in iter_jsonl(data))
    use_gpu = torch.cuda.is_available() and not args.cpu
    packing = {"ours-nopack": {"packing": False}, "ours-pack": {"packing": True},
               "ours-compile": {"compile_layers": True}}.get(engine, {})
    tc = TrainConfig(target=str(model_dir), bsize=args.bsize, accumsteps=args.accumsteps, lr=args.lr,
                     epochs=args.epochs, bf16=args.bf16, max_length=args.seq_len, zero_stage=args.zero_stage,
                     use_gpu=use_gpu, answer_logits_only=engine != "ours-fullhead", warmup_ratio=0.0,
                     eval_fraction=0.0, **packing)
    empty = Path(args.workdir) / "empty.jsonl"
    write_jsonl(empty, [])
    cpu = CpuClock(args.epochs)
    state = train_loop({"target": str(model_dir), "train": dataclasses.asdict(tc), "train_path": str(records),
                        "eval_path": str(empty), "time_phases": True, "on_step": cpu})
    last = state["history"][-1]
    micro = last["steps"] * args.accumsteps
    return {"tokens_per_second": last["tokens_per_second"], "epoch_seconds": last["train_seconds"],
            "tokens": last["tokens"], "padded_tokens": last["padded_tokens"], "micro_batches": micro,
            "optimizer_steps": last["steps"], "loss": round(last["train_loss"], 4),
            "packing": state["engine"].get("packed"), "zero_stage": state["engine"].get("zero_stage"),
            "cpu_seconds": round(cpu.seconds, 3), "tokens_per_cpu_second": round(last["tokens"] / cpu.seconds, 1),
            **split(last["train_seconds"], last.get("phase_seconds", {}), micro)}


class CpuClock:
    """An `on_step` hook: this process's CPU seconds (all threads) over the last epoch's steps, from the end of
    the one before. On a shared machine CPU time moves less with the load than wall time (the load takes CPUs away,
    not work); OpenMP threads that spin while waiting count too, alike for every engine."""

    def __init__(self, epochs: int):
        self.epochs, self.started, self.seconds = epochs, 0.0, 0.0

    def __call__(self, info) -> None:
        if info.step == info.micro_batches - 1 and info.epoch == self.epochs - 2:
            self.started = time.process_time()
        elif info.step == info.micro_batches - 1 and info.epoch == self.epochs - 1:
            self.seconds = time.process_time() - self.started


class Timer:
    """Times a Trainer's last epoch and its phases: a TrainerCallback for the epoch, the micro batches and the
    optimizer (gradient clipping + step), wrappers for the model's forward and the backward."""

    def __init__(self, trainer_cls):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kw):
                timer.sync()
                timer.started, timer.phases, timer.micro, timer.steps = time.perf_counter(), {}, 0, 0
                timer.cpu_started = time.process_time()

            def on_epoch_end(self, args, state, control, **kw):
                timer.sync()
                timer.epochs.append(time.perf_counter() - timer.started)
                timer.cpu_seconds = time.process_time() - timer.cpu_started

            def on_substep_end(self, args, state, control, **kw):
                timer.micro += 1

            def on_optimizer_step(self, args, state, control, **kw):
                timer.add("optimizer", timer.opt_started)

            def on_step_end(self, args, state, control, **kw):
                timer.micro, timer.steps = timer.micro + 1, timer.steps + 1

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    timer.loss = logs["loss"]

        self.callback, self.epochs, self.started, self.loss = _CB(), [], 0.0, None
        self.phases, self.micro, self.steps, self.opt_started = {}, 0, 0, 0.0
        self.cpu_started, self.cpu_seconds = 0.0, 0.0
        self.trainer_cls = trainer_cls

    @staticmethod
    def sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def add(self, phase: str, since: float) -> None:
        self.sync()
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - since

    def attach(self, trainer) -> None:
        timer, model = self, trainer.model

        def pre_forward(module, args, kwargs):
            timer.sync()
            timer.fwd_started = time.perf_counter()

        model.register_forward_pre_hook(pre_forward, with_kwargs=True)
        model.register_forward_hook(lambda m, a, o: timer.add("forward", timer.fwd_started))
        backward = trainer.accelerator.backward

        def timed_backward(loss, **kw):
            timer.sync()
            t = time.perf_counter()
            backward(loss, **kw)
            timer.add("backward", t)

        trainer.accelerator.backward = timed_backward
        clip = trainer._clip_grad_norm

        def timed_clip(model_):  # clipping, then on_pre_optimizer_step, the step, on_optimizer_step
            timer.sync()
            timer.opt_started = time.perf_counter()
            return clip(model_)

        trainer._clip_grad_norm = timed_clip

    def result(self, stats: dict) -> dict:
        seconds = self.epochs[-1]
        return {"tokens_per_second": round(stats["tokens"] / seconds, 1), "epoch_seconds": round(seconds, 3),
                "micro_batches": self.micro, "optimizer_steps": self.steps, "loss": self.loss,
                "cpu_seconds": round(self.cpu_seconds, 3),
                "tokens_per_cpu_second": round(stats["tokens"] / self.cpu_seconds, 1),
                **split(seconds, self.phases, self.micro)}


def _hf_args(args, cls, **extra):
    import torch

    return cls(output_dir=str(Path(args.workdir) / "hf-out"), per_device_train_batch_size=args.bsize,
               gradient_accumulation_steps=args.accumsteps, learning_rate=args.lr, num_train_epochs=args.epochs,
               bf16=args.bf16, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
               logging_steps=args.steps, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
               use_cpu=not torch.cuda.is_available() or args.cpu, disable_tqdm=True, **extra)


def _load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def run_hf(args, model_dir: Path, data: Path, stats: dict, packed: bool) -> dict:
    import dataclasses

    from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer,
                              TrainingArguments)

    from bootfinetune.run.jsonio import iter_jsonl

    rows = list(iter_jsonl(data))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if packed:  # the micro batch in one row, positions restarting per record, the first label of each -100
        dataset, collator, extra = rows, DataCollatorWithFlattening(return_position_ids=True), {}
    else:  # a plain list is a map-style dataset to the Trainer (its length grouping reads input_ids)
        dataset = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        extra = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields
                 else {"group_by_length": True})  # the option's name before transformers 5.x
    timer = Timer(Trainer)
    trainer = Trainer(model=_load_model(model_dir), args=_hf_args(args, TrainingArguments, **extra),
                      train_dataset=dataset, data_collator=collator, callbacks=[timer.callback])
    timer.attach(trainer)
    trainer.train()
    return timer.result(stats)


def run_trl(args, model_dir: Path, data: Path, stats: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from bootfinetune.run.jsonio import iter_jsonl

    rows = list(iter_jsonl(data))
    # Pre-tokenized: TRL takes input_ids and completion_mask as they are (the same ids as the others).
    dataset = Dataset.from_list([{"input_ids": r["input_ids"],
                                  "completion_mask": [int(t != -100) for t in r["labels"]]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    timer = Timer(SFTTrainer)
    config = _hf_args(args, SFTConfig, packing=True, max_length=args.seq_len, completion_only_loss=True)
    trainer = SFTTrainer(model=_load_model(model_dir), args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[timer.callback])
    timer.attach(trainer)
    trainer.train()
    return timer.result(stats)


def worker(args) -> None:
    """One engine in this process; prints one JSON line."""
    import torch

    if not torch.cuda.is_available() or args.cpu:
        torch.set_num_threads(args.threads)
    model_dir, data, stats = Path(args.model_dir), Path(args.data), json.loads(args.stats)
    if args.engine.startswith("ours"):
        out = run_ours(args, model_dir, data, args.engine)
    elif args.engine.startswith("hf"):
        out = run_hf(args, model_dir, data, stats, packed=args.engine == "hf-packed")
    else:
        out = run_trl(args, model_dir, data, stats)
    if torch.cuda.is_available() and not args.cpu:
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ driver


def summary_line(size: str, results: dict, gpu: bool) -> str | None:
    """A line of details (which HF set-up was faster, ours against its own variants, the ratios in tokens per
    CPU second: steadier on a shared machine), then `<size>: ours N tokens/s; ours/hf X.XXx, ours/trl Y.YYx`
    (hf: the faster of its set-ups)."""
    if "ours" not in results:
        return None

    def ratios(key: str) -> list[str]:
        ours = results["ours"][key]
        hf = [(r[key], e) for e, r in results.items() if e.startswith("hf")]
        out = [f"ours/hf {ours / max(hf)[0]:.2f}x"] if hf else []
        if "trl" in results:
            out.append(f"ours/trl {ours / results['trl'][key]:.2f}x")
        return out

    best_hf = max((r["tokens_per_second"], e) for e, r in results.items() if e.startswith("hf"))[1] if any(
        e.startswith("hf") for e in results) else None
    variants = [f"ours/{e} {results['ours']['tokens_per_second'] / r['tokens_per_second']:.2f}x"
                for e, r in results.items() if e.startswith("ours-")]
    detail = ", ".join([f"hf = {best_hf}"] * bool(best_hf) + variants
                       + ([f"per CPU second: {', '.join(ratios('tokens_per_cpu_second'))}"]
                          if not gpu and ratios("tokens_per_cpu_second") else [])
                       + ([f"MFU {results['ours']['mfu']:.1%}"] if gpu else []))
    return (f"{size} ({detail})\n{size}: ours {results['ours']['tokens_per_second']:.0f} tokens/s; "
            + ", ".join(ratios("tokens_per_second")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", nargs="+", default=None, choices=sorted(SIZES),
                    help="model sizes (default: small on CPU, 0.5b and 1.5b on a GPU)")
    ap.add_argument("--engines", nargs="+", default=list(DEFAULT_ENGINES), choices=ENGINES)
    ap.add_argument("--seq-len", type=int, default=None, help="max_length (default 512 on CPU, 1024 on a GPU)")
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=[100, 400], help="prompt lengths drawn from")
    ap.add_argument("--answer-tokens", type=int, nargs=2, default=[5, 60], help="answer lengths drawn from")
    ap.add_argument("--synthetic", action="store_true",
                    help="the older records instead: prompts of 0.5 to 1 x --seq-len, one-word answers")
    ap.add_argument("--bsize", type=int, default=8)
    ap.add_argument("--accumsteps", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="micro batches of records per epoch "
                    "(default 8 CPU, 30 GPU)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--zero-stage", type=lambda s: s if s == "auto" else int(s), default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on CPU")
    ap.add_argument("--cpu", action="store_true", help="stay on CPU even with a GPU")
    ap.add_argument("--out", help="also append every JSON line to this file")
    ap.add_argument("--workdir", default="/tmp/bootfinetune-bench-finetune")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return worker(args)

    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    sizes = args.size or (["0.5b", "1.5b"] if gpu else ["small"])
    args.seq_len = args.seq_len or (1024 if gpu else 512)
    args.steps = args.steps or (30 if gpu else 8)
    device = torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)"

    def emit(obj: dict) -> None:
        print(json.dumps(obj), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(obj) + "\n")

    emit({"device": device, "torch": torch.__version__, "seq_len": args.seq_len, "bsize": args.bsize,
          "accumsteps": args.accumsteps, "micro_batches_of_records": args.steps, "epochs": args.epochs,
          "bf16": args.bf16, "records": "synthetic" if args.synthetic else
          {"prompt_tokens": args.prompt_tokens, "answer_tokens": args.answer_tokens},
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load": os.getloadavg()[0]})
    summary = []
    for size in sizes:
        args.size = size
        started = time.time()
        model_dir, data, stats = prepare(args)
        fpt = flops_per_token(model_dir, stats)
        params = sum(p.numel() for p in _load_model(model_dir).parameters())
        emit({"size": size, "parameters": params, "prepare_seconds": round(time.time() - started, 1),
              **{k: round(v, 1) if isinstance(v, float) else v for k, v in stats.items()}})
        results = {}
        for engine in args.engines:
            cmd = [sys.executable, __file__, "--engine", engine, "--model-dir", str(model_dir), "--data", str(data),
                   "--stats", json.dumps(stats), "--size", size, "--seq-len", str(args.seq_len),
                   "--bsize", str(args.bsize), "--accumsteps", str(args.accumsteps), "--steps", str(args.steps),
                   "--epochs", str(args.epochs), "--lr", str(args.lr), "--zero-stage", str(args.zero_stage),
                   "--threads", str(args.threads), "--workdir", args.workdir] + (["--bf16"] if args.bf16 else []) \
                + (["--cpu"] if args.cpu else [])
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
                print(json.dumps({"size": size, "engine": engine, "failed": proc.returncode}) + "\n" + tail,
                      flush=True)
                continue
            out = json.loads(line[len("RESULT "):])
            out.update(size=size, engine=engine, wall_seconds=round(time.time() - t0, 1),
                       load=round(os.getloadavg()[0], 1))
            if gpu:
                out["mfu"] = round(fpt * out["tokens_per_second"] / H100_BF16_PEAK, 4)
            results[engine] = out
            emit(out)
        line = summary_line(size, results, gpu)
        if line:
            summary.append(line)
    for line in summary:
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"summary": line}) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
