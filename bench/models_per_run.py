"""The finetune stage's fixed cost per model: three model keys against one model on the same records.

    python bench/models_per_run.py                       # 3 keys x 24 records against 1 key x 72, 2 epochs
    python bench/models_per_run.py --records 48 --repeat 2 --out bench/results/cpu-models-per-run.jsonl

A three-predictor program compiled with `multitask=False` trains one model per predictor; the same
traces with `multitask=True` train one model on all of them. Both sides here call the finetune stage
itself (`finetune_models`) on a fresh run directory, with the same tiny Llama target, the same records
in all (toy DSPy-shaped records, `testing.toy_records`), the same options, and every CPU of this machine
given to one worker (`cpus_per_worker`, as the demo does), so the three keys of one side share one
worker group. Ray is started once, before both sides. Each line printed is JSON; the last one is the
ratio (three keys / one key, goal <= 1.3x): the fixed cost paid per model is what makes it exceed 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bootfinetune.config import TrainConfig  # noqa: E402
from bootfinetune.run.jsonio import write_jsonl  # noqa: E402
from bootfinetune.run.rundir import RunDir  # noqa: E402
from bootfinetune.runtime.ray_env import ensure_ray  # noqa: E402
from bootfinetune.stages.finetune import FinetuneJob, finetune_models  # noqa: E402
from bootfinetune.testing.tiny_models import build_tiny_causal, toy_records  # noqa: E402


def side(root: Path, target: str, keys: list[str], records: int, config: TrainConfig) -> dict:
    """Trains `keys` on `records` records in all (split evenly) and returns the stage's seconds and timings."""
    run = RunDir(root)
    per_key = records // len(keys)
    jobs = []
    for i, key in enumerate(keys):
        write_jsonl(run.data_file(key), toy_records(per_key, seed=i, predictor=key))
        jobs.append(FinetuneJob(key, target, (key,), run.data_file(key)))
    started = time.time()
    manifests = finetune_models(run, jobs, config)
    seconds = time.time() - started
    return {"keys": len(keys), "records": per_key * len(keys), "seconds": round(seconds, 2),
            "train_seconds": round(sum(m.timings.get("train_seconds", 0.0) for m in manifests.values()), 2),
            "timings": {k: m.timings for k, m in manifests.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=72, help="records in all, on each side")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="runs of each side, alternating; the best counts")
    p.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = p.parse_args()
    cpus = os.cpu_count() or 2
    ensure_ray("local", num_cpus=cpus, log_to_driver=False)
    lines = []

    def emit(line: dict) -> None:
        lines.append(line)
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-models-per-run-") as tmp:
        target = str(build_tiny_causal(Path(tmp) / "target"))
        config = TrainConfig(target=target, bsize=8, lr=3e-3, epochs=args.epochs, max_length=256, num_workers=1,
                             cpus_per_worker=float(cpus))
        best: dict[int, float] = {}
        for r in range(args.repeat):
            for keys in (["all"], ["first", "second", "third"]):
                result = side(Path(tmp) / f"run-{len(keys)}-{r}", target, keys, args.records, config)
                emit({"case": f"{len(keys)} key(s)", "run": r + 1, "load": round(os.getloadavg()[0], 1), **result})
                best[len(keys)] = min(best.get(len(keys), float("inf")), result["seconds"])
        emit({"case": "ratio", "three_keys_seconds": best[3], "one_key_seconds": best[1],
              "ratio": round(best[3] / best[1], 2), "goal": "<= 1.3"})


if __name__ == "__main__":
    main()
