"""Training throughput: bootfinetune's loop against TRL's `SFTTrainer` and the Hugging Face `Trainer`.

    python bench/finetune.py                                          # CPU: a small Llama, fp32
    python bench/finetune.py --size 0.5b 1.5b --seq-len 1024 --bf16   # one GPU (bf16)

Every engine trains the same causal model (random weights from a config, saved once and
loaded with `from_pretrained`), on the same token ids: synthetic chat records, prompts
of 0.5 to 1 x `--seq-len` tokens and a short answer, tokenized once by bootfinetune's
renderer (loss on the answer only). Same micro batch, accumulation, learning rate, AdamW,
precision and number of epochs; each engine runs in its own process, one at a time.

- `ours`: `bootfinetune.training.train_loop` (DeepSpeed, length buckets, LM head on answer positions).
- `ours-fullhead`: the same loop with `answer_logits_only=False` (the head on every position).
- `hf`: `transformers.Trainer` with its length-grouped sampler (`group_by_length`), padding per batch.
- `trl`: `trl.SFTTrainer` as DSPy's local finetuning sets it up: `packing=True` (TRL's
  best-fit packing, padding-free), completion-only loss.

tokens/s counts real (non-padding) tokens, over the last epoch (the first holds warm-up).
MFU (GPU) = model FLOPs per token x tokens/s / peak bf16 (989 TFLOP/s for an H100 SXM):
FLOPs per token = 6 x (non-embedding parameters) + 6 x layers x hidden x mean context
(causal attention) + 6 x vocab x hidden x (share of positions the loss needs: answers).
It is the same formula for every engine; an engine that runs the head everywhere does
that work on top. The last line gives ours / TRL and ours / HF.
"""

from __future__ import annotations

import argparse
import json
import os
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
ENGINES = ("ours", "ours-fullhead", "hf", "trl")
H100_BF16_PEAK = 989e12


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
    records = synthetic_records(n, args.seq_len, seed=0)
    write_jsonl(work / "records.jsonl", records)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded, _ = encode_records(tokenizer, records, "causal", args.seq_len)
    data = work / f"encoded-{args.size}-{args.seq_len}.jsonl"
    write_jsonl(data, ({"input_ids": e.input_ids, "labels": e.labels} for e in encoded))
    lengths = [len(e.input_ids) for e in encoded]
    answers = sum(sum(1 for t in e.labels if t != -100) for e in encoded)
    return model_dir, data, {"records": n, "tokens": sum(lengths), "answer_tokens": answers,
                             "mean_length": sum(lengths) / n, "max_length": max(lengths),
                             "token_weighted_length": sum(x * x for x in lengths) / sum(lengths)}


def flops_per_token(model_dir: Path, stats: dict) -> float:
    import json as _json

    cfg = _json.loads((model_dir / "config.json").read_text())
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


# ----------------------------------------------------------------------------------------- engines


def run_ours(args, model_dir: Path, data: Path, full_head: bool) -> dict:
    import dataclasses

    import torch

    from bootfinetune.config import TrainConfig
    from bootfinetune.run.jsonio import iter_jsonl, write_jsonl
    from bootfinetune.training.train_loop import train_loop

    # The loop reads chat records; the same ones the others get as token ids.
    records = Path(args.workdir) / "records.jsonl"
    assert sum(1 for _ in iter_jsonl(records)) == sum(1 for _ in iter_jsonl(data))
    use_gpu = torch.cuda.is_available() and not args.cpu
    tc = TrainConfig(target=str(model_dir), bsize=args.bsize, accumsteps=args.accumsteps, lr=args.lr,
                     epochs=args.epochs, bf16=args.bf16, max_length=args.seq_len, zero_stage=args.zero_stage,
                     use_gpu=use_gpu, answer_logits_only=not full_head, warmup_ratio=0.0, eval_fraction=0.0)
    empty = Path(args.workdir) / "empty.jsonl"
    write_jsonl(empty, [])
    state = train_loop({"target": str(model_dir), "train": dataclasses.asdict(tc), "train_path": str(records),
                        "eval_path": str(empty)})
    last = state["history"][-1]
    return {"tokens_per_second": last["tokens_per_second"], "epoch_seconds": last["train_seconds"],
            "tokens": last["tokens"], "padded_tokens": last["padded_tokens"],
            "loss": round(last["train_loss"], 4), "answer_logits_only": state["answer_logits_only"]}


class EpochTimer:
    """A TrainerCallback that times each epoch (the last one counts)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kw):
                timer.sync()
                timer.started = time.perf_counter()

            def on_epoch_end(self, args, state, control, **kw):
                timer.sync()
                timer.epochs.append(time.perf_counter() - timer.started)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    timer.loss = logs["loss"]

        self.callback, self.epochs, self.started, self.loss = _CB(), [], 0.0, None

    @staticmethod
    def sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


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


def run_hf(args, model_dir: Path, data: Path, stats: dict) -> dict:
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from bootfinetune.run.jsonio import iter_jsonl

    # A plain list is a map-style dataset to the Trainer (its length grouping reads input_ids).
    dataset = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in iter_jsonl(data)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    timer = EpochTimer()
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    bucketing = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields
                 else {"group_by_length": True})  # the option's name before transformers 5.x
    trainer = Trainer(model=_load_model(model_dir), args=_hf_args(args, TrainingArguments, **bucketing),
                      train_dataset=dataset, data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
                      callbacks=[timer.callback])
    trainer.train()
    return {"tokens_per_second": round(stats["tokens"] / timer.epochs[-1], 1),
            "epoch_seconds": round(timer.epochs[-1], 3), "loss": timer.loss}


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
    timer = EpochTimer()
    config = _hf_args(args, SFTConfig, packing=True, max_length=args.seq_len, completion_only_loss=True)
    trainer = SFTTrainer(model=_load_model(model_dir), args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[timer.callback])
    trainer.train()
    return {"tokens_per_second": round(stats["tokens"] / timer.epochs[-1], 1),
            "epoch_seconds": round(timer.epochs[-1], 3), "loss": timer.loss}


def worker(args) -> None:
    """One engine in this process; prints one JSON line."""
    import torch

    if not torch.cuda.is_available() or args.cpu:
        torch.set_num_threads(args.threads)
    model_dir, data, stats = Path(args.model_dir), Path(args.data), json.loads(args.stats)
    if args.engine in ("ours", "ours-fullhead"):
        out = run_ours(args, model_dir, data, full_head=args.engine == "ours-fullhead")
    elif args.engine == "hf":
        out = run_hf(args, model_dir, data, stats)
    else:
        out = run_trl(args, model_dir, data, stats)
    if torch.cuda.is_available() and not args.cpu:
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", nargs="+", default=None, choices=sorted(SIZES),
                    help="model sizes (default: small on CPU, 0.5b and 1.5b on a GPU)")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--seq-len", type=int, default=None, help="max_length (default 256 on CPU, 1024 on a GPU)")
    ap.add_argument("--bsize", type=int, default=8)
    ap.add_argument("--accumsteps", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per epoch (default 12 CPU, 30 GPU)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--zero-stage", type=lambda s: s if s == "auto" else int(s), default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on CPU")
    ap.add_argument("--cpu", action="store_true", help="stay on CPU even with a GPU")
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
    args.seq_len = args.seq_len or (1024 if gpu else 256)
    args.steps = args.steps or (30 if gpu else 12)
    device = torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)"
    print(json.dumps({"device": device, "torch": torch.__version__, "seq_len": args.seq_len, "bsize": args.bsize,
                      "accumsteps": args.accumsteps, "steps_per_epoch": args.steps, "epochs": args.epochs,
                      "bf16": args.bf16}), flush=True)
    summary = []
    for size in sizes:
        args.size = size
        started = time.time()
        model_dir, data, stats = prepare(args)
        fpt = flops_per_token(model_dir, stats)
        params = sum(p.numel() for p in _load_model(model_dir).parameters())
        print(json.dumps({"size": size, "parameters": params, "prepare_seconds": round(time.time() - started, 1),
                          **{k: round(v, 1) if isinstance(v, float) else v for k, v in stats.items()}}), flush=True)
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
            out.update(size=size, engine=engine, wall_seconds=round(time.time() - t0, 1))
            if gpu:
                out["mfu"] = round(fpt * out["tokens_per_second"] / H100_BF16_PEAK, 4)
            results[engine] = out
            print(json.dumps(out), flush=True)
        if "ours" in results:
            ours = results["ours"]["tokens_per_second"]
            ratios = {f"ours/{e}": round(ours / r["tokens_per_second"], 3) for e, r in results.items() if e != "ours"}
            summary.append(f"{size}: ours {ours:.0f} tokens/s; " + ", ".join(f"{k} {v}x" for k, v in ratios.items())
                           + (f"; MFU {results['ours']['mfu']:.1%}" if gpu else ""))
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
