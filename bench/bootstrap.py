"""Bootstrapping throughput: bootfinetune's Ray Data stage against DSPy's `bootstrap_trace_data`.

    python bench/bootstrap.py                          # n = 1,000 and 5,000, one local node
    python bench/bootstrap.py --nodes 2 --n 5000 --actors 1 2 4 --threads-per-actor 16   # two nodes, scaling
    python bench/bootstrap.py --n 200 --repeat 1       # a quick look

Both sides run the same one-predictor program (`question -> answer`) against the same teacher:
an OpenAI-compatible server in its own process on 127.0.0.1 that answers every request after
a fixed latency (100 ms), reached through `dspy.LM(..., cache=False)`, so every example costs a
real HTTP round trip through LiteLLM. Both keep the same number of calls in flight: DSPy's
`num_threads`, and ours `actors x threads per actor`. The metric is exact match, and both sides
must keep the same number of traces.

The limit is n x latency / calls in flight: the time if nothing but the teacher's latency
counted. Times are wall clock for the whole stage (for ours, from `run_bootstrap` to its
records on disk, actor start-up included; Ray itself is started beforehand, as it is on a
cluster, and its start is printed apart). Each case runs `--repeat` times; the best run counts.
The last line is the ratio at the largest n.
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


def answer_of(question: str) -> str:
    """The teacher's answer and the gold label: the question's words reversed."""
    return " ".join(reversed(question.split()))


def serve(latency: float) -> None:
    """Runs the teacher server until stdin closes; prints its URL first (the --serve mode)."""
    from bootfinetune.testing.teacher_server import TeacherServer

    def script(inputs, outputs):
        return {name: answer_of(inputs.get("question", "")) for name in outputs}

    server = TeacherServer(script, latency=latency, model_name="bench-teacher").start()
    print(server.url, flush=True)
    sys.stdin.read()
    server.stop()


class Teacher:
    """The teacher server in a child process, so its threads share no GIL with either side."""

    def __init__(self, latency: float):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(latency)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"the teacher server did not start: {self.url!r}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def examples(n: int, salt: str):
    import dspy

    # Every run gets fresh questions (the salt), so no cache of any layer can answer for the teacher.
    words = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper"]
    return [dspy.Example(question=f"{salt} {i} " + " ".join(words[(i * 7 + k) % 10] for k in range(6)),
                         answer=None).with_inputs("question") for i in range(n)]


def make_program():
    import dspy

    return dspy.Predict("question -> answer")


def metric(example, prediction, trace=None):
    return prediction.answer.strip() == answer_of(example.question)


def run_dspy(lm, data, threads: int) -> tuple[float, int]:
    import dspy
    from dspy.teleprompt.bootstrap_trace import bootstrap_trace_data

    program = make_program()
    with dspy.context(lm=lm):
        started = time.perf_counter()
        results = bootstrap_trace_data(program, data, metric=metric, num_threads=threads)
        seconds = time.perf_counter() - started
    return seconds, sum(1 for r in results if r.get("score"))


def run_ours(lm, data, actors: int, threads: int, batch_size: int, workdir: Path) -> tuple[float, int]:
    from bootfinetune.stages.bootstrap import run_bootstrap
    from bootfinetune.config import BootstrapConfig
    from bootfinetune.run.rundir import RunDir

    run = RunDir.at(str(workdir), f"run-{time.time_ns()}")
    config = BootstrapConfig(num_actors=actors, num_threads=threads, batch_size=batch_size,
                             actor_cpus=0.5, max_errors=0)
    started = time.perf_counter()
    result = run_bootstrap(run, teachers=[make_program()], examples=data, metric=metric, config=config,
                           settings={"lm": lm})
    seconds = time.perf_counter() - started
    return seconds, result.summary.kept


def start_ray(nodes: int):
    import ray

    from bootfinetune.runtime.ray_env import ensure_ray

    started = time.perf_counter()
    cluster = None
    if nodes == 1:
        ensure_ray(log_to_driver=False)
    else:
        from ray.cluster_utils import Cluster

        cpus = max(1, (os.cpu_count() or 2) // nodes)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        ensure_ray(cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return cluster, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 5000], help="examples per case")
    ap.add_argument("--latency", type=float, default=0.1, help="teacher latency, seconds")
    ap.add_argument("--in-flight", type=int, default=32, help="calls in flight on each side")
    ap.add_argument("--actors", type=int, nargs="+", default=[2],
                    help="actor counts to try (threads per actor = in-flight / actors)")
    ap.add_argument("--threads-per-actor", type=int, default=None,
                    help="fix the threads per actor instead (calls in flight = actors x threads; DSPy gets as many)")
    ap.add_argument("--batch-size", type=int, default=64, help="examples per Ray Data batch")
    ap.add_argument("--model", default="openai/gpt-4o-mini",
                    help="the teacher's model name (the server answers any; DSPy looks its price up per call)")
    ap.add_argument("--nodes", type=int, default=1, help="1: one local Ray node; 2+: a local multi-node cluster")
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the best counts")
    ap.add_argument("--skip-dspy", action="store_true")
    args = ap.parse_args()
    if args.serve is not None:
        return serve(args.serve)

    import logging

    import dspy

    logging.getLogger("dspy").setLevel(logging.ERROR)
    teacher = Teacher(args.latency)
    lm = dspy.LM(args.model, api_base=teacher.url, api_key="unused", cache=False, num_retries=0)
    cluster, ray_seconds = start_ray(args.nodes)
    import ray

    print(json.dumps({"machine": f"{platform.node()} {os.cpu_count()} cores", "python": platform.python_version(),
                      "dspy": dspy.__version__, "ray": ray.__version__, "nodes": args.nodes,
                      "ray_start_seconds": round(ray_seconds, 2), "latency": args.latency,
                      "in_flight": args.in_flight if not args.threads_per_actor else None}), flush=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-bootstrap-") as tmp:
            dspy_times: dict[tuple[int, int], float] = {}
            for n in args.n:
                for actors in args.actors:
                    threads = args.threads_per_actor or max(1, args.in_flight // actors)
                    in_flight = actors * threads
                    limit = n * args.latency / in_flight
                    if not args.skip_dspy and (n, in_flight) not in dspy_times:
                        for r in range(args.repeat):
                            seconds, kept = run_dspy(lm, examples(n, f"dspy{in_flight}-{r}"), in_flight)
                            if kept != n:
                                raise RuntimeError(f"DSPy kept {kept} of {n}; the teacher or metric is off")
                            dspy_times[n, in_flight] = min(seconds, dspy_times.get((n, in_flight), seconds))
                    dspy_best = dspy_times.get((n, in_flight))
                    best = None
                    for r in range(args.repeat):
                        seconds, kept = run_ours(lm, examples(n, f"ours{actors}-{r}"), actors, threads,
                                                 args.batch_size, Path(tmp))
                        if kept != n:
                            raise RuntimeError(f"bootfinetune kept {kept} of {n}; the teacher or metric is off")
                        best = seconds if best is None else min(best, seconds)
                    row = {"n": n, "nodes": args.nodes, "actors": actors, "threads_per_actor": threads,
                           "in_flight": in_flight, "limit_s": round(limit, 2),
                           "ours_s": round(best, 2), "ours_over_limit": round(best / limit, 3),
                           "dspy_s": None if dspy_best is None else round(dspy_best, 2),
                           "dspy_over_limit": None if dspy_best is None else round(dspy_best / limit, 3),
                           "speedup_vs_dspy": None if dspy_best is None else round(dspy_best / best, 3)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        teacher.close()
    last = [r for r in rows if r["n"] == max(args.n)]
    best_row = min(last, key=lambda r: r["ours_s"])
    print(f"n={best_row['n']}: ours {best_row['ours_s']} s ({best_row['actors']} actors), "
          f"dspy {best_row['dspy_s']} s, limit {best_row['limit_s']} s; "
          f"ours/limit {best_row['ours_over_limit']}x; speedup vs DSPy {best_row['speedup_vs_dspy']}x")


if __name__ == "__main__":
    main()
