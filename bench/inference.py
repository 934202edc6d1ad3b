"""Inference throughput of a compiled program: batched generation against one `generate` per example.

    python bench/inference.py                      # compiles the demo first if no run is given (~4 min)
    python bench/inference.py --run-dir bootfinetune_runs/TicketRouter-1a2b3c

The compiled program is the demo's (two predictors, one finetuned Llama; `bootfinetune demo`),
loaded with `bootfinetune.load(run_dir)`, over the demo's 200-example valset:

- `batched`: `dspy.Evaluate(num_threads=--threads)`; the program's `FinetunedLM` gathers the
  concurrent calls into `generate` batches of up to `--batch-size` prompts (what compile's
  evaluation and a served program do);
- `per-example`: the same program, one example at a time, its LM set to `batch_size=1`, so
  every call is one `generate` of one prompt.

Both decode greedily, so both must give the same answers (checked: the scores and every
prediction match). It prints examples/s for each and, last, the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")


def demo_run(workdir: Path) -> Path:
    """A finished demo run directory: compiled here unless one exists in `workdir`."""
    runs = workdir / "runs"
    done = [p.parent for p in runs.glob("*/program.json")]
    if not done:
        print(f"no run given: compiling the demo into {runs} (a few minutes, once)", flush=True)
        subprocess.run([sys.executable, "-m", "bootfinetune.entrypoints.cli", "demo", "--storage", str(runs)], check=True,
                       stdout=subprocess.DEVNULL)
        done = [p.parent for p in runs.glob("*/program.json")]
    return sorted(done)[-1]


def set_batch_size(program, batch_size: int) -> None:
    from bootfinetune.serving.lm import finetuned_engine

    for lm in {id(p.lm): p.lm for p in program.predictors()}.values():
        finetuned_engine(lm).set_batch_size(batch_size)


def run(program, valset, metric, threads: int) -> tuple[float, float, list]:
    import dspy

    evaluator = dspy.Evaluate(devset=valset, metric=metric, num_threads=threads, display_progress=False,
                              max_errors=len(valset))
    started = time.perf_counter()
    result = evaluator(program)
    seconds = time.perf_counter() - started
    answers = [dict(pred.items()) if hasattr(pred, "items") else str(pred) for _, pred, _ in result.results]
    return seconds, float(result.score), answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="a finished compile of the demo program (default: compile one)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bootfinetune-bench-inference"))
    ap.add_argument("--threads", type=int, default=32, help="examples in flight for the batched run")
    ap.add_argument("--batch-size", type=int, default=32, help="most prompts per generate call")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the best counts")
    args = ap.parse_args()

    import torch

    import bootfinetune
    from bootfinetune.demo.task import demo_valset, metric

    run_dir = Path(args.run_dir) if args.run_dir else demo_run(Path(args.workdir))
    valset = demo_valset()
    program = bootfinetune.load(run_dir)
    lms = {id(p.lm): p.lm for p in program.predictors()}
    device = next(iter(lms.values())).device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({"machine": f"{platform.node()} {os.cpu_count()} cores", "device": device,
                      "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "run_dir": str(run_dir),
                      "examples": len(valset), "predictors": len(program.predictors()), "models": len(lms),
                      "threads": args.threads, "batch_size": args.batch_size}), flush=True)

    rows = {}
    for name, threads, batch_size in (("per-example", 1, 1), ("batched", args.threads, args.batch_size)):
        set_batch_size(program, batch_size)
        run(program, valset[:8], metric, threads)  # loads the model and warms up
        best = None
        for _ in range(args.repeat):
            seconds, score, answers = run(program, valset, metric, threads)
            if best is None or seconds < best[0]:
                best = (seconds, score, answers)
        rows[name] = best
        print(json.dumps({"mode": name, "threads": threads, "batch_size": batch_size, "seconds": round(best[0], 2),
                          "examples_per_second": round(len(valset) / best[0], 2), "score": best[1]}), flush=True)
    same = rows["per-example"][2] == rows["batched"][2]
    if not same:
        differ = sum(a != b for a, b in zip(rows["per-example"][2], rows["batched"][2]))
        print(f"WARNING: {differ} of {len(valset)} predictions differ between the two runs", flush=True)
    ratio = rows["per-example"][0] / rows["batched"][0]
    print(f"batched {len(valset) / rows['batched'][0]:.1f} examples/s vs per-example "
          f"{len(valset) / rows['per-example'][0]:.1f}: {ratio:.2f}x; same predictions: {same}")


if __name__ == "__main__":
    main()
