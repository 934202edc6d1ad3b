"""Training throughput of `train_loop` without Ray: one process or torchrun, on a causal LM of a given size.

    python bench/train_standalone.py --size 0.5b --seq-len 1024 --bf16                   # one GPU
    torchrun --nproc_per_node 8 bench/train_standalone.py --size 0.5b --seq-len 1024 --bf16
    python bench/train_standalone.py --size tiny --seq-len 256 --steps 10                # CPU smoke

It builds a model with random weights from a config (no hub), writes synthetic chat records
about `--seq-len` tokens long, runs `--epochs` epochs of `--steps` micro batches, and prints
one JSON line per epoch plus a summary; tokens/s is over all ranks, from the last epoch
(the first one includes warm-up). It never imports Ray (checked at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Only the training modules are needed; the package's __init__ pulls in the compiler (DSPy, Ray),
# which a bare GPU machine may lack. Registering the package path skips that __init__.
if "bootfinetune" not in sys.modules:
    _pkg = types.ModuleType("bootfinetune")
    _pkg.__path__ = [str(ROOT / "bootfinetune")]
    sys.modules["bootfinetune"] = _pkg

from bootfinetune.config import TrainConfig  # noqa: E402
from bootfinetune.run.jsonio import write_jsonl  # noqa: E402
from bootfinetune.testing.tiny_models import build_tiny_causal  # noqa: E402
from bootfinetune.training.train_loop import train_loop  # noqa: E402

SIZES = {
    # Qwen2.5-0.5B's shape with an untied output head: 0.63B parameters.
    "0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                 vocab_size=151936),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=512),
}


def synthetic_records(n: int, approx_tokens: int, seed: int) -> list[dict]:
    """Chat records whose prompts vary in length around `approx_tokens` (answers are short)."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "ocean", "pixel", "amber"]
    rows = []
    for i in range(n):
        # The tiny tokenizer spends ~3 tokens on a word and its space.
        n_words = max(4, int(approx_tokens * rng.uniform(0.5, 1.0) / 3))
        rows.append({"messages": [
            {"role": "user", "content": "[[ ## question ## ]]\n" + " ".join(rng.choice(words) for _ in range(n_words))},
            {"role": "assistant", "content": f"[[ ## answer ## ]]\n{rng.choice(words)}\n\n[[ ## completed ## ]]"},
        ], "predictor": "qa", "example_index": i})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--seq-len", type=int, default=1024, help="max_length; prompts are drawn around it")
    ap.add_argument("--bsize", type=int, default=8, help="micro batch per rank")
    ap.add_argument("--accumsteps", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="micro batches per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--zero-stage", type=lambda s: s if s == "auto" else int(s), default="auto")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="train on CPU even when CUDA is present")
    ap.add_argument("--workdir", default="/tmp/bootfinetune-bench")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    use_gpu = torch.cuda.is_available() and not args.cpu
    work = Path(args.workdir)
    model_dir = build_tiny_causal(work / f"model-{args.size}", chat_template=False, max_positions=args.seq_len,
                                  **SIZES[args.size])  # every rank builds the same (cached) directory
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    n_records = args.bsize * args.steps * world
    data = work / f"train-{args.seq_len}-{n_records}.jsonl"
    if not data.exists():
        write_jsonl(data, synthetic_records(n_records, args.seq_len, seed=0))

    tc = TrainConfig(target=str(model_dir), bsize=args.bsize, accumsteps=args.accumsteps, lr=1e-4,
                     epochs=args.epochs, bf16=args.bf16, max_length=args.seq_len, zero_stage=args.zero_stage,
                     gradient_checkpointing=args.gradient_checkpointing, use_gpu=use_gpu)
    started = time.time()
    state = train_loop({"target": str(model_dir), "train": dataclasses.asdict(tc), "train_path": str(data),
                        "max_steps_per_epoch": args.steps})
    if state is not None:  # rank 0
        for h in state["history"]:
            print(json.dumps({"epoch": h["epoch"], "train_loss": round(h["train_loss"], 4),
                              "tokens": h["tokens"], "padded_tokens": h["padded_tokens"],
                              "seconds": h["train_seconds"], "tokens_per_second": h["tokens_per_second"]}))
        last = state["history"][-1]
        params = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"])
                     .load_file(str(model_dir / "model.safetensors")).values())
        print(json.dumps({
            "summary": True, "size": args.size, "parameters": params, "world_size": state["world_size"],
            "device": torch.cuda.get_device_name() if use_gpu else "cpu", "bf16": args.bf16,
            "zero_stage": args.zero_stage, "engine": state.get("engine"), "seq_len": args.seq_len, "bsize": args.bsize,
            "tokens_per_second": last["tokens_per_second"],
            "padding_fraction": round(last["padded_tokens"] / max(1, last["tokens"] + last["padded_tokens"]), 4),
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if use_gpu else None,
            "wall_seconds": round(time.time() - started, 1),
        }))
    if "ray" in sys.modules:
        raise RuntimeError("the standalone benchmark imported ray; train_loop must not need it")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
