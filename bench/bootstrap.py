"""Bootstrapping throughput: bootfinetune's Ray Data stage against DSPy's `bootstrap_trace_data`.

    python bench/bootstrap.py                          # the default cases, both programs
    python bench/bootstrap.py --cases 200x32 --program predict   # a quick look
    python bench/bootstrap.py --nodes 2 --cases 5000x64 --actors 4   # two local nodes
    python bench/bootstrap.py --rate-limit 20 --cases 600x32        # a teacher that allows 20 calls/s

Both sides run the same program against the same teacher: an OpenAI-compatible server in its own
process on 127.0.0.1 that answers every request after a fixed latency (100 ms), reached through
`dspy.LM(..., cache=False)`, so every example costs a real HTTP round trip. It names the model in its
replies as OpenAI does for `gpt-4o-mini` (the dated snapshot, `gpt-4o-mini-2024-07-18`): DSPy prices every
call by that name, and a name missing from its price table costs a scan of the whole table per call
(0.8 ms here, about a sixth of a call's client CPU), which a real provider's replies do not. Two programs: a bare
`dspy.Predict("question -> answer")` ("predict", which has `aforward`) and a `dspy.Module` subclass
that defines only `forward` around it ("module", the common case). Both sides keep the same number
of calls in flight: DSPy's `num_threads`, and ours `actors x slots per actor`. The metric is exact
match, and both sides must keep every trace.

The limit is n x latency / calls in flight: the time if nothing but the teacher's latency
counted. Times are wall clock for the whole stage (for ours, from `run_bootstrap` to its
records on disk, actor start-up included; Ray itself is started beforehand, as it is on a
cluster, and its start is printed apart). Client CPU is the CPU seconds the bootstrapping processes
spent per teacher call: for DSPy the driver process; for ours the driver and every Ray process
it started (workers, raylet, GCS), reaped ones included; the teacher server's never. Each case runs
`--repeat` times; the best run counts.
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

import dspy  # noqa: E402


def answer_of(question: str) -> str:
    """The teacher's answer and the gold label: the question's words reversed."""
    return " ".join(reversed(question.split()))


def serve(latency: float, rate_limit: float | None = None) -> None:
    """Runs the teacher server until stdin closes; prints its URL first (the --serve mode)."""
    from bootfinetune.testing.faults import RateLimitedTeacherServer
    from bootfinetune.testing.teacher_server import TeacherServer

    def script(inputs, outputs):
        return {name: answer_of(inputs.get("question", "")) for name in outputs}

    if rate_limit:  # a provider's limit as a token bucket holding a third of a second of calls
        server = RateLimitedTeacherServer(script, calls_per_second=rate_limit, burst=rate_limit / 3, latency=latency,
                                          model_name="gpt-4o-mini-2024-07-18").start()
    else:
        server = TeacherServer(script, latency=latency, model_name="gpt-4o-mini-2024-07-18").start()
    print(server.url, flush=True)
    sys.stdin.read()
    server.stop()


class Teacher:
    """The teacher server in a child process, so its threads share no GIL with either side."""

    def __init__(self, latency: float, rate_limit: float | None = None):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(latency), "--rate-limit",
                                      str(rate_limit or 0)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"the teacher server did not start: {self.url!r}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def examples(n: int, salt: str):
    # Every run gets fresh questions (the salt), so no cache of any layer can answer for the teacher.
    words = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper"]
    return [dspy.Example(question=f"{salt} {i} " + " ".join(words[(i * 7 + k) % 10] for k in range(6)),
                         answer=None).with_inputs("question") for i in range(n)]


def make_program(kind: str = "predict"):
    if kind == "predict":
        return dspy.Predict("question -> answer")
    return Answerer()


class Answerer(dspy.Module):
    """A user program as most are written: a module with only `forward` (no `aforward`)."""

    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.predict(question=question)


class TreeCPU:
    """CPU seconds spent since it started by this process and, with `tree`, every process it started
    (Ray's GCS, raylet, workers and actors), minus the `exclude` pids' trees (the teacher server).

    Ray reaps its workers without adding their CPU to its own, so a thread samples every process of
    the tree every 0.5 s and keeps each one's last reading: a process that ends loses at most its last 0.5 s
    (the pool's actors end idle, after the last result).
    """

    def __init__(self, exclude: tuple[int, ...] = (), tree: bool = True, every: float = 0.5):
        import threading

        import psutil

        self.root, self.exclude, self.tree, self.every = psutil.Process(), set(exclude), tree, every
        self.seen: dict[int, float] = {}
        self.start = dict(self._sample())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _sample(self) -> dict[int, float]:
        import psutil

        procs = [self.root] + (self.root.children(recursive=True) if self.tree else [])
        skip = set()
        for pid in self.exclude:
            try:
                skip |= {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
        out = {}
        for proc in procs:
            if proc.pid in skip:
                continue
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            out[proc.pid] = t.user + t.system
        return out

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            self.seen.update(self._sample())

    def seconds(self) -> float:
        self.stop.set()
        self.thread.join()
        self.seen.update(self._sample())
        return sum(cpu - self.start.get(pid, 0.0) for pid, cpu in self.seen.items())


def metric(example, prediction, trace=None):
    return prediction.answer.strip() == answer_of(example.question)


def run_dspy(lm, data, threads: int, kind: str) -> tuple[float, int, float]:
    import dspy
    from dspy.teleprompt.bootstrap_trace import bootstrap_trace_data

    program = make_program(kind)
    with dspy.context(lm=lm):
        cpu = TreeCPU(tree=False)
        started = time.perf_counter()
        results = bootstrap_trace_data(program, data, metric=metric, num_threads=threads)
        seconds = time.perf_counter() - started
        cpu_seconds = cpu.seconds()
    return seconds, sum(1 for r in results if r.get("score")), cpu_seconds


def run_ours(lm, data, actors: int, threads: int, batch_size: int, workdir: Path, kind: str, engine: str,
             teacher_pid: int, **limits: float) -> tuple[float, int, float, str]:
    from bootfinetune.stages.bootstrap import run_bootstrap
    from bootfinetune.config import BootstrapConfig
    from bootfinetune.run.rundir import RunDir

    run = RunDir.at(str(workdir), f"run-{time.time_ns()}")
    config = BootstrapConfig(num_actors=actors, num_threads=threads, batch_size=batch_size,
                             actor_cpus=0.5, max_errors=0, engine=engine, **limits)
    cpu = TreeCPU(exclude=(teacher_pid,))
    started = time.perf_counter()
    result = run_bootstrap(run, teachers=[make_program(kind)], examples=data, metric=metric, config=config,
                           settings={"lm": lm})
    seconds = time.perf_counter() - started
    return seconds, result.summary.kept, cpu.seconds(), result.summary.engine


def stop(cluster, teacher: Teacher) -> None:
    import ray

    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    teacher.close()


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
    # Ray Data starts three helper actors (stats, autoscaling, actor locations) on a cluster's first dataset,
    # once per cluster: started here with Ray, as on a cluster in use, rather than charged to the first case.
    ray.data.range(2, override_num_blocks=1).map_batches(_Noop, compute=ray.data.ActorPoolStrategy(size=1),
                                                         num_cpus=0.1).take_all()
    return cluster, time.perf_counter() - started


class _Noop:
    def __call__(self, batch):
        return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--cases", nargs="+", default=["1000x32", "5000x32", "5000x128@2"],
                    help="NxF[@A]: n examples with F calls in flight on each side (@A: A actors, else --actors)")
    ap.add_argument("--program", nargs="+", default=["predict", "module"], choices=["predict", "module"],
                    help="predict: bare dspy.Predict (has aforward); module: a dspy.Module with only forward")
    ap.add_argument("--latency", type=float, default=0.1, help="teacher latency, seconds")
    ap.add_argument("--actors", type=int, nargs="+", default=[2],
                    help="actor counts to try (slots per actor = in-flight / actors)")
    ap.add_argument("--engine", default="auto", choices=["auto", "async", "threads"], help="our actors' engine")
    ap.add_argument("--batch-size", type=int, default=16, help="examples per Ray Data batch")
    ap.add_argument("--model", default="openai/gpt-4o-mini",
                    help="the teacher's model name (the server answers any; DSPy looks its price up per call)")
    ap.add_argument("--nodes", type=int, default=1, help="1: one local Ray node; 2+: a local multi-node cluster")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the best counts")
    ap.add_argument("--skip-dspy", action="store_true")
    ap.add_argument("--rate-limit", type=float, default=0,
                    help="R: the teacher allows R calls/s (429 with Retry-After past it); ours runs with "
                         "max_calls_per_second=R, DSPy as it is; reports the rate each achieved and the 429s")
    args = ap.parse_args()
    if args.serve is not None:
        return serve(args.serve, args.rate_limit)
    if args.rate_limit:
        return rate_limited(args)

    import logging

    import dspy

    logging.getLogger("dspy").setLevel(logging.ERROR)
    teacher = Teacher(args.latency)
    # Two retries on both sides: under load the local server now and then drops a kept-alive connection.
    lm = dspy.LM(args.model, api_base=teacher.url, api_key="unused", cache=False, num_retries=2)
    cluster, ray_seconds = start_ray(args.nodes)
    import ray

    print(json.dumps({"machine": f"{platform.node()} {os.cpu_count()} cores", "python": platform.python_version(),
                      "dspy": dspy.__version__, "ray": ray.__version__, "nodes": args.nodes,
                      "ray_start_seconds": round(ray_seconds, 2), "latency": args.latency,
                      "load_average": [round(x, 2) for x in os.getloadavg()], "engine": args.engine,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}), flush=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-bootstrap-") as tmp:
            for kind in args.program:
                for case in args.cases:
                    spec, _, case_actors = case.partition("@")
                    n, in_flight = (int(x) for x in spec.lower().split("x"))
                    limit = n * args.latency / in_flight
                    dspy_best = dspy_cpu = None
                    for r in range(0 if args.skip_dspy else args.repeat):
                        seconds, kept, cpu = run_dspy(lm, examples(n, f"dspy-{kind}{in_flight}-{r}"), in_flight, kind)
                        if kept != n:
                            raise RuntimeError(f"DSPy kept {kept} of {n}; the teacher or metric is off")
                        if dspy_best is None or seconds < dspy_best:
                            dspy_best, dspy_cpu = seconds, cpu
                    for actors in ([int(case_actors)] if case_actors else args.actors):
                        threads = max(1, in_flight // actors)
                        best = best_cpu = engine = None
                        for r in range(args.repeat):
                            seconds, kept, cpu, engine = run_ours(lm, examples(n, f"ours-{kind}{actors}-{r}"), actors,
                                                                  threads, args.batch_size, Path(tmp), kind,
                                                                  args.engine, teacher.proc.pid)
                            if kept != n:
                                raise RuntimeError(f"bootfinetune kept {kept} of {n}; the teacher or metric is off")
                            if best is None or seconds < best:
                                best, best_cpu = seconds, cpu
                        row = {"program": kind, "n": n, "nodes": args.nodes, "actors": actors,
                               "slots_per_actor": threads, "in_flight": actors * threads, "engine": engine,
                               "limit_s": round(limit, 2), "ours_s": round(best, 2),
                               "ours_over_limit": round(best / limit, 3),
                               "ours_cpu_ms_per_call": round(1000 * best_cpu / n, 2),
                               "dspy_s": None if dspy_best is None else round(dspy_best, 2),
                               "dspy_over_limit": None if dspy_best is None else round(dspy_best / limit, 3),
                               "dspy_cpu_ms_per_call": None if dspy_cpu is None else round(1000 * dspy_cpu / n, 2),
                               "speedup_vs_dspy": None if dspy_best is None else round(dspy_best / best, 3),
                               "load_average": round(os.getloadavg()[0], 2)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        stop(cluster, teacher)
    for row in rows:
        print(f"{row['program']:8s} n={row['n']} in flight {row['in_flight']}: ours {row['ours_s']} s "
              f"({row['ours_over_limit']}x limit, {row['ours_cpu_ms_per_call']} ms CPU/call, {row['engine']}); "
              f"DSPy {row['dspy_s']} s ({row['dspy_over_limit']}x limit, {row['dspy_cpu_ms_per_call']} ms CPU/call); "
              f"speedup {row['speedup_vs_dspy']}x")


def rate_limited(args) -> None:
    """Both sides against a teacher that allows `args.rate_limit` calls/s: the rate achieved and the 429s.

    The achieved rate is the teacher's accepted calls over the time from the first to the last; "429s after
    1 s" counts those more than a second after a side's first accepted call.
    """
    import logging
    import urllib.request

    logging.getLogger("dspy").setLevel(logging.ERROR)
    logging.getLogger("bootfinetune.stages.ratelimit").setLevel(logging.ERROR)
    rate = args.rate_limit
    teacher = Teacher(args.latency, rate)
    lm = dspy.LM(args.model, api_base=teacher.url, api_key="unused", cache=False, num_retries=3)
    cluster, _ = start_ray(args.nodes)

    def window(start: float, end: float) -> dict:
        stats = json.load(urllib.request.urlopen(teacher.url + "/stats"))
        ok = [t for t in stats["accepted"] if start <= t <= end]
        limited = [t for t in stats["limited"] if start <= t <= end]
        achieved = (len(ok) - 1) / (ok[-1] - ok[0]) if len(ok) > 1 else None
        return {"accepted": len(ok), "achieved_calls_per_s": achieved and round(achieved, 2),
                "within_10pct": achieved is not None and abs(achieved - rate) <= 0.1 * rate,
                "429s": len(limited), "429s_after_1s": sum(t > ok[0] + 1.0 for t in limited) if ok else None}

    try:
        with tempfile.TemporaryDirectory(prefix="bench-bootstrap-") as tmp:
            for case in args.cases:
                spec, _, case_actors = case.partition("@")
                n, in_flight = (int(x) for x in spec.lower().split("x"))
                actors = int(case_actors) if case_actors else args.actors[0]
                row = {"program": args.program[0], "n": n, "in_flight": in_flight, "teacher_limit_calls_per_s": rate}
                start = time.monotonic()
                seconds, kept, _, engine = run_ours(lm, examples(n, f"rl-ours-{time.time()}"), actors,
                                                    max(1, in_flight // actors), args.batch_size, Path(tmp),
                                                    args.program[0], args.engine, teacher.proc.pid,
                                                    max_calls_per_second=rate)
                row["ours"] = {"seconds": round(seconds, 2), "kept": kept, "engine": engine,
                               **window(start, time.monotonic())}
                if not args.skip_dspy:
                    from dspy.teleprompt.bootstrap_trace import bootstrap_trace_data

                    start = time.monotonic()
                    with dspy.context(lm=lm):
                        results = bootstrap_trace_data(make_program(args.program[0]), examples(n, f"rl-dspy-{time.time()}"),
                                                       metric=metric, num_threads=in_flight, raise_on_error=False)
                    row["dspy"] = {"seconds": round(time.monotonic() - start, 2),
                                   "kept": sum(1 for r in results if r.get("score")), **window(start, time.monotonic())}
                print(json.dumps(row), flush=True)
    finally:
        stop(cluster, teacher)


if __name__ == "__main__":
    main()
