"""The largest causal model that finetunes on one GPU: plain data parallel against ZeRO-3 with CPU offload.

    python bench/memory.py                                  # sizes 3b and 7b, both modes (one GPU)
    python bench/memory.py --sizes 1.5b 3b --modes plain

For each size (Qwen2.5 shapes with an untied head, random bf16 weights saved once and loaded
by the loop with `from_pretrained`) and mode, `bootfinetune.training.train_loop` runs a few optimizer
steps in its own process, with bf16, micro batch 1, sequence length 1,024 and gradient
checkpointing in both modes:

- `plain`: ZeRO stage 0 (plain data parallel; one rank holds the weights, gradients, fp32
  master weights and AdamW state on the GPU);
- `zero3-offload`: ZeRO-3 with parameters and optimizer state offloaded to CPU memory (the
  optimizer step runs there, with DeepSpeed's CPU Adam).

It prints, per run, whether it trained, the peak GPU memory, the peak host memory and the
seconds per step; the last line names the largest size that trained in each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_standalone import SIZES, synthetic_records  # noqa: E402  (also registers bootfinetune lightly)

SIZES = {
    **SIZES,
    "1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                 vocab_size=151936),
    "3b": dict(hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, intermediate_size=11008,
               vocab_size=151936),
    "7b": dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
               vocab_size=151936),
}
MODES = {"plain": dict(zero_stage=0), "zero3-offload": dict(zero_stage=3, offload_params=True, offload_optimizer=True)}


def build(size: str, work: Path) -> Path:
    """Random bf16 weights of the size, saved with a tiny tokenizer (built on the GPU: fast)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bootfinetune.testing.tiny_models import build_tiny_causal

    out = work / f"model-{size}"
    if (out / "config.json").exists():
        return out
    shape = SIZES[size]
    tok_dir = build_tiny_causal(work / "tokenizer", chat_template=False, hidden_size=64, num_layers=1, num_heads=4,
                                vocab_size=512)
    config = AutoConfig.from_pretrained(tok_dir)
    config.update(dict(hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_layers"],
                       num_attention_heads=shape["num_heads"], num_key_value_heads=shape.get("num_kv_heads") or shape["num_heads"],
                       intermediate_size=shape.get("intermediate_size") or 4 * shape["hidden_size"], vocab_size=shape["vocab_size"],
                       max_position_embeddings=4096, tie_word_embeddings=False))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    del model
    torch.cuda.empty_cache()  # give the GPU back before the runs (each in its own process)
    return out


def worker(args) -> None:
    import dataclasses

    import torch

    from bootfinetune.config import TrainConfig
    from bootfinetune.run.jsonio import write_jsonl
    from bootfinetune.training.train_loop import train_loop

    work = Path(args.workdir)
    data = work / "records.jsonl"
    write_jsonl(data, synthetic_records(args.steps + 2, args.seq_len, seed=0))
    tc = TrainConfig(target=args.model_dir, bsize=1, lr=1e-5, epochs=1, bf16=True, max_length=args.seq_len,
                     gradient_checkpointing=True, use_gpu=torch.cuda.is_available(), eval_fraction=0.0,
                     warmup_ratio=0.0, **MODES[args.mode])
    empty = work / "empty.jsonl"
    write_jsonl(empty, [])
    state = train_loop({"target": args.model_dir, "train": dataclasses.asdict(tc), "train_path": str(data),
                        "eval_path": str(empty), "max_steps_per_epoch": args.steps})
    h = state["history"][-1]
    print("RESULT " + json.dumps({
        "trained": True, "steps": h["steps"], "seconds_per_step": round(h["train_seconds"] / h["steps"], 2),
        "loss": round(h["train_loss"], 3),
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "host_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["3b", "7b"], choices=sorted(SIZES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=400, help="seconds per run")
    ap.add_argument("--workdir", default="/tmp/bootfinetune-bench-memory")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return worker(args)

    import torch

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(json.dumps({"device": device, "gpu_gib": total and round(total, 1), "host_gib": round(host, 1),
                      "seq_len": args.seq_len, "bsize": 1}), flush=True)
    largest: dict[str, str | None] = {m: None for m in args.modes}
    for size in args.sizes:
        t0 = time.time()
        model_dir = build(size, work)
        from safetensors import safe_open

        params = 0
        for shard in model_dir.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    params += n
        print(json.dumps({"size": size, "parameters": params, "build_seconds": round(time.time() - t0, 1)}),
              flush=True)
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--mode", mode, "--model-dir", str(model_dir), "--seq-len",
                   str(args.seq_len), "--steps", str(args.steps), "--workdir", str(work)]
            t0 = time.time()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                out_text, code = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                out_text, code = str(exc.stdout or "") + str(exc.stderr or ""), "timeout"
            line = next((ln for ln in out_text.splitlines() if ln.startswith("RESULT ")), None)
            if line:
                row = json.loads(line[len("RESULT "):])
                largest[mode] = size
            else:
                reason = ("out of GPU memory" if "CUDA out of memory" in out_text or "OutOfMemoryError" in out_text
                          else "killed (host memory)" if code in (-9, 137) else f"exit {code}")
                row = {"trained": False, "reason": reason,
                       "tail": [ln for ln in out_text.splitlines() if ln.strip()][-3:]}
            row.update(size=size, parameters=params, mode=mode, wall_seconds=round(time.time() - t0, 1))
            print(json.dumps(row), flush=True)
    print("largest that trained: " + ", ".join(f"{m} {s or 'none of ' + '/'.join(args.sizes)}"
                                               for m, s in largest.items()))


if __name__ == "__main__":
    main()
