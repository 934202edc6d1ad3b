"""Stage 2: run the teacher program over a set of examples on Ray Data and keep its traces.

The driver turns the examples into a Ray Dataset of plain rows (`example_index`, the
example as JSON) and maps them with `TeacherRunner`, a callable class that Ray Data
runs in a pool of actors. Each actor holds the teacher programs and keeps
`num_threads` examples in flight, since teacher calls wait on the network. Every
trace step is attributed to its predictor by name, so a predictor called twice (a
loop) gives two records and one never called (a branch) gives none.

Results come back as JSON strings and are appended to the trace store
(`bootfinetune.stages.traces`) as they arrive, keyed by a hash of the example: every run with the
same trace identity reads them back, so only examples new to the store call the teacher,
and a rerun after a crash skips the examples already done. A finished stage (its summary
written in the run directory) is read back without reading the store at all.

Retries are bounded (`bootfinetune.stages.retries`): a batch whose worker died runs again once, then
the examples it lost run alone; one whose worker still dies is a failure record ("WorkerDied").
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import cloudpickle
import dspy
from dspy.utils.callback import BaseCallback

from bootfinetune.config import BootstrapConfig
from bootfinetune.training.distributed import node_id
from bootfinetune.runtime.ray_env import WORKER_ENV
from bootfinetune.errors import BootstrapError
from bootfinetune.run.jsonio import iter_jsonl, write_json, write_jsonl
from bootfinetune.run.records import CallRecord, FailureRecord, example_from_json, example_to_json, to_jsonable
from bootfinetune.common.redaction import redact
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import BootstrapSummary, read_record
from bootfinetune.stages.retries import BlockErrors, bounded_retries, worker_died
from bootfinetune.stages.traces import TraceStore, example_changes, example_key, identity_changes, restamp
from bootfinetune.runtime.user_code import ship_user_modules

logger = logging.getLogger(__name__)

DRIVER_SETTINGS = ("lm", "rm", "adapter")
"""`dspy.configure` settings a program cannot run without: carried to every actor (or the compile stops
with the reason when one cannot be pickled)."""
PER_CALL_SETTINGS = ("trace", "usage_tracker", "caller_predict", "caller_modules", "send_stream", "stream_listeners",
                     "branch_idx")
"""Settings that belong to one call in progress (set by DSPy as it runs): never carried."""
_WARNED: set[str] = set()


def driver_settings() -> dict[str, Any]:
    """The driver's `dspy.configure` settings that actors must see too.

    Every setting changed from DSPy's default is carried (callbacks, track_usage, disable_history,
    max_history_size, provide_traceback, warn_on_type_mismatch, async_max_workers, num_threads,
    interpreter_factory, and any key of the user's own), except `PER_CALL_SETTINGS` and private
    `_` keys. One that cannot be pickled stays behind, with a warning naming it; lm, rm and
    adapter are always carried.
    """
    from dspy.dsp.utils.settings import DEFAULT_CONFIG

    carried = {}
    for name, value in dspy.settings.config.items():
        if value is None or name in PER_CALL_SETTINGS or name.startswith("_"):
            continue
        if name not in DRIVER_SETTINGS:
            if name in DEFAULT_CONFIG and value == DEFAULT_CONFIG[name]:
                continue
            try:
                cloudpickle.dumps(value)
            except Exception as exc:  # cloudpickle raises many types; the setting stays behind, said once
                if name not in _WARNED:
                    _WARNED.add(name)
                    logger.warning("dspy.configure(%s=...) cannot be sent to Ray actors (%s: %s); it does not hold "
                                   "inside them. Make it picklable to carry it.", name, type(exc).__name__, exc)
                continue
        carried[name] = value
    return carried


def is_kept(score: Any, threshold: float | None) -> bool:
    """Whether a metric score keeps a trace: bools as they are, numbers by the threshold (or truthiness).

    >>> is_kept(True, None), is_kept(0.4, 0.5), is_kept(0.5, 0.5), is_kept(None, None)
    (True, False, True, True)
    """
    if score is None:
        return True
    score = getattr(score, "score", score)  # metrics may return dspy.Prediction(score=..., feedback=...)
    if isinstance(score, bool) or threshold is None:
        return bool(score)
    return float(score) >= threshold


def score_value(score: Any) -> float | None:
    score = getattr(score, "score", score)
    return None if score is None else float(score)


class _LMCallCounter(BaseCallback):
    """Counts the LM calls one example makes (cache hits included)."""

    def __init__(self):
        self.count = 0

    def on_lm_start(self, call_id, instance, inputs):
        self.count += 1


class TeacherRunner:
    """The callable class Ray Data runs in each actor: examples in, JSON results out.

    It is a plain class, so it runs without Ray too:

    >>> runner = TeacherRunner([program], metric=None, settings={"lm": lm})      # doctest: +SKIP
    >>> runner({"example_index": [0], "example": [example_to_json(ex)]})         # doctest: +SKIP
    {'example_index': [0], 'teacher': [0], 'result': ['{"calls": [...], ...}']}

    Args:
        teachers: Teacher programs; each runs every example and their traces are pooled.
        metric: `metric(example, prediction, trace)`, or None to keep every trace.
        settings: Driver `dspy.configure` settings (`driver_settings()`) to apply here.
        teacher_settings: Settings applied while the teacher runs, e.g. {"lm": big_lm}.
        num_threads: Examples in flight at once in this actor.
        metric_threshold: For float scores: keep when score >= threshold.
        secrets: Strings to redact from error messages.
        split: "train" or "val", copied into each record.
    """

    def __init__(self, teachers: list[dspy.Module], metric: Callable | None = None,
                 settings: dict[str, Any] | None = None, teacher_settings: dict[str, Any] | None = None,
                 num_threads: int = 8, metric_threshold: float | None = None,
                 secrets: list[str] | None = None, split: str = "train"):
        for name, value in WORKER_ENV.items():
            os.environ.setdefault(name, value)
        self.teachers = teachers
        self.metric = metric
        self.context = {**(settings or {}), **(teacher_settings or {})}
        self.metric_threshold = metric_threshold
        self.secrets = secrets or []
        self.split = split
        self.names = [{id(p): n for n, p in t.named_predictors()} for t in teachers]
        self.pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="teacher")
        self.node = node_id()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        jobs = [(int(i), str(e), t) for i, e in zip(batch["example_index"], batch["example"])
                for t in range(len(self.teachers))]
        results = list(self.pool.map(lambda job: self.run_one(*job), jobs))
        return {"example_index": [j[0] for j in jobs], "teacher": [j[2] for j in jobs],
                "result": [json.dumps(r, ensure_ascii=False) for r in results]}

    def run_one(self, example_index: int, example_json: str, teacher_index: int) -> dict[str, Any]:
        """Runs one teacher on one example; returns {"calls": [...]} or {"failure": {...}}, plus counts."""
        example = example_from_json(example_json)
        teacher, names = self.teachers[teacher_index], self.names[teacher_index]
        counter, trace = _LMCallCounter(), []
        callbacks = list(self.context.get("callbacks") or dspy.settings.callbacks or []) + [counter]
        stage = "program"
        try:
            with dspy.context(**{**self.context, "trace": trace, "callbacks": callbacks}):
                prediction = teacher(**example.inputs())
                stage = "metric"
                score = self.metric(example, prediction, trace) if self.metric else None
        except Exception as exc:  # any failure of the user's program or metric becomes a failure record
            failure = FailureRecord(example_index=example_index, error_type=type(exc).__name__,
                                    message=redact(str(exc), self.secrets)[:2000], teacher=teacher_index,
                                    split=self.split, stage=stage)
            return {"failure": failure.to_dict(), "teacher_calls": counter.count, "node": self.node}
        kept = is_kept(score, self.metric_threshold)
        calls, unattributed = [], 0
        for pred, inputs, outputs in trace:
            name = names.get(id(pred))
            if name is None:
                unattributed += 1
                continue
            sig = pred.signature
            calls.append(CallRecord(
                example_index=example_index, predictor=name, call_index=len(calls),
                inputs={k: to_jsonable(v) for k, v in inputs.items() if k in sig.input_fields},
                outputs={k: to_jsonable(outputs[k]) for k in sig.output_fields if k in outputs},
                score=score_value(score), kept=kept, teacher=teacher_index, split=self.split,
            ).to_dict())
        return {"calls": calls, "kept": kept, "score": score_value(score), "teacher_calls": counter.count,
                "unattributed": unattributed, "node": self.node}


@dataclass
class BootstrapResult:
    """What the bootstrap stage hands to the data stage."""

    calls: list[CallRecord]
    """Every recorded predictor call, kept or not, ordered by (example_index, teacher, call_index)."""
    failures: list[FailureRecord]
    """Examples that raised, ordered by (example_index, teacher)."""
    summary: BootstrapSummary
    """Counts and time."""
    resumed: bool = False
    """True when the results were read back from a finished run directory."""


def load_bootstrap(run: RunDir, split: str = "train") -> BootstrapResult | None:
    """Reads a finished bootstrap back from the run directory, or None if it did not finish."""
    paths = bootstrap_paths(run, split)
    if not paths["summary"].exists():
        return None
    calls = [CallRecord(**r) for r in iter_jsonl(paths["calls"])]
    failures = [FailureRecord(**r) for r in iter_jsonl(paths["failures"])]
    return BootstrapResult(calls, failures, read_record(BootstrapSummary, paths["summary"]), resumed=True)


def bootstrap_paths(run: RunDir, split: str) -> dict[str, Any]:
    d = run.bootstrap_dir
    return {"calls": d / f"{split}.calls.jsonl", "failures": d / f"{split}.failures.jsonl",
            "summary": d / f"{split}.summary.json"}


def run_bootstrap(run: RunDir, *, teachers: list[dspy.Module], examples: list[dspy.Example],
                  metric: Callable | None, config: BootstrapConfig, teacher_settings: dict[str, Any] | None = None,
                  settings: dict[str, Any] | None = None, secrets: list[str] | None = None,
                  split: str = "train", store: TraceStore | None = None) -> BootstrapResult:
    """Runs the teachers over the examples the trace store lacks, on Ray Data, or reads a finished run back.

    Args:
        run: The run directory; results go to bootstrap/{split}.*.
        teachers: Teacher programs (checked beforehand).
        examples: The examples, in their original order (`example_index` is the position).
        metric: `metric(example, prediction, trace)` or None.
        config: Actors, threads, batch size, max_errors, threshold.
        teacher_settings: Applied with dspy.context while teachers run.
        settings: Driver settings to apply in actors; defaults to the current dspy.configure ones.
        secrets: Strings to redact from failure messages.
        split: "train" or "val".
        store: The trace store shared by runs with the same trace identity; None keeps one
            private to this run directory (bootstrap/store/).

    Raises:
        BootstrapError: when more than `config.max_errors` examples failed.
    """
    done = load_bootstrap(run, split)
    if done is not None:
        logger.info("bootstrap[%s]: finished earlier, read back from %s (teacher not called)", split, run.root)
        return done
    started = time.time()
    store = store or TraceStore(run.bootstrap_dir / "store")
    keys = [example_key(ex) for ex in examples]
    stored = store.load()
    teacher_ids = range(len(teachers))
    first_of: dict[str, int] = {}  # an example given twice runs once
    for i, key in enumerate(keys):
        if any((key, t) not in stored for t in teacher_ids):
            first_of.setdefault(key, i)
    fresh: dict[tuple[str, int], dict] = {}
    if first_of:
        runner_kwargs = dict(teachers=teachers, metric=metric,
                             settings=driver_settings() if settings is None else settings,
                             teacher_settings=teacher_settings or {}, num_threads=config.num_threads,
                             metric_threshold=config.metric_threshold, secrets=secrets or [], split=split)
        failures = 0
        try:
            with store.appender() as out:
                for index, teacher, result in run_examples(
                        list(first_of.values()), examples, runner_kwargs, num_actors=config.num_actors,
                        batch_size=config.batch_size, num_cpus=config.actor_cpus):
                    key = keys[index]
                    if (key, teacher) in stored:  # another teacher's result for this example was missing
                        continue
                    fresh[(key, teacher)] = result
                    out.add(key, teacher, result)
                    if "failure" in result:  # a "WorkerDied" example counts like any other failure
                        failures += 1
                        if failures > config.max_errors:
                            raise BootstrapError(_too_many_errors(fresh, config.max_errors, split))
        finally:
            store.sync()
    results = {(i, t): restamp(fresh.get((key, t)) or stored[(key, t)], i, split)
               for i, key in enumerate(keys) for t in teacher_ids}
    reused = sum(all((key, t) in stored for t in teacher_ids) for key in keys)
    if reused:
        logger.info("bootstrap[%s]: %d of %d example(s) read from the trace store %s; %d sent to the teacher",
                    split, reused, len(examples), store.location, len(first_of))
    return _finish(run, paths=bootstrap_paths(run, split), results=results, n_examples=len(examples),
                   started=started, fresh=set(fresh), keys=keys, reused=reused)


POOL_START_TIMEOUT_S = 600  # seconds for the actor pool to start before the run fails, naming the resources


def run_examples(indices: list[int], examples: list[dspy.Example], runner_kwargs: dict[str, Any], *,
                 num_actors: int, batch_size: int, num_cpus: float) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Runs TeacherRunner over the examples at `indices` on Ray Data; yields (example_index, teacher, result).

    Every (example, teacher) is yielded once, as results arrive: in batches first; then the examples a dead
    worker took with it run again alone, and one whose worker dies alone too is yielded as a "WorkerDied"
    failure (`bootfinetune.stages.retries`).
    """
    import ray

    teachers = range(len(runner_kwargs["teachers"]))
    seen: set[tuple[int, int]] = set()
    pending, errors = list(indices), BlockErrors()
    for alone in (False, True):
        if not pending:
            return
        if alone:
            logger.warning("bootstrap[%s]: %d example(s) were in batches whose worker died; running them one per "
                           "task to find the one that kills it", runner_kwargs.get("split", "train"), len(pending))
        rows = [{"example_index": i, "example": example_to_json(examples[i])} for i in pending]
        blocks = len(rows) if alone else min(len(rows), num_actors * 4)
        mapped = map_teacher_runner(ray.data.from_items(rows, override_num_blocks=blocks), runner_kwargs,
                                    num_actors=min(num_actors, len(rows)) if alone else num_actors,
                                    batch_size=1 if alone else batch_size, num_cpus=num_cpus, max_tasks=blocks,
                                    one_at_a_time=alone)
        errors = BlockErrors()
        with errors.attached():
            for row in mapped.iter_rows():
                done = (int(row["example_index"]), int(row["teacher"]))
                if done not in seen:  # a batch re-run after its worker died may bring some back twice
                    seen.add(done)
                    yield done[0], done[1], json.loads(row["result"])
        pending = [i for i in pending if any((i, t) not in seen for t in teachers)]
    for i in pending:
        for t in teachers:
            if (i, t) not in seen:
                yield i, t, worker_died(i, t, runner_kwargs.get("split", "train"), errors.last,
                                        runner_kwargs.get("secrets") or [])


def map_teacher_runner(dataset: Any, runner_kwargs: dict[str, Any], *, num_actors: int, batch_size: int,
                       num_cpus: float, max_tasks: int, one_at_a_time: bool = False) -> Any:
    """`dataset.map_batches(TeacherRunner)` on a pool of actors: where user objects are handed to Ray.

    The user's own modules (programs, metrics, retrievers, callbacks defined beside the driver) are
    registered to travel by value first, so the actors need not find them on their path. Retries are
    bounded (`bootfinetune.stages.retries`): a task that failed all its attempts is dropped rather than
    failing the run, so its rows are missing from the output (results are keyed by example).

    Args:
        max_tasks: An upper bound on the tasks (the dataset's blocks), which bounds actor restarts.
        one_at_a_time: One task per actor at a time, so a worker's death takes no queued task with it.
    """
    import ray

    ship_user_modules()
    # Dispatch only once every actor of the pool is up: otherwise the first actor ready takes all the
    # blocks of a small trainset while the others (often on other nodes) are still importing DSPy.
    dataset.context.wait_for_min_actors_s = max(dataset.context.wait_for_min_actors_s, POOL_START_TIMEOUT_S)
    with warnings.catch_warnings():
        # Ray 2.60 takes an actor's max_restarts / max_task_retries only as `ray_remote_args`, which it warns
        # are deprecated: they are what bounds the retries (test_worker_faults.py fails if they stop applying).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return dataset.map_batches(TeacherRunner, fn_constructor_kwargs=runner_kwargs,
                                   compute=ray.data.ActorPoolStrategy(
                                       size=num_actors, max_tasks_in_flight_per_actor=1 if one_at_a_time else None),
                                   batch_size=batch_size, num_cpus=num_cpus,
                                   **bounded_retries(dataset.context, max_tasks))


def _too_many_errors(results: dict, max_errors: int, split: str) -> str:
    failed = sorted((r["failure"] for r in results.values() if "failure" in r), key=lambda f: f["example_index"])
    shown = "\n".join(f"  example {f['example_index']}: {f['error_type']}: {f['message'][:300]}" for f in failed[:3])
    return (f"bootstrap[{split}] stopped: {len(failed)} examples failed, more than max_errors={max_errors}. "
            f"First failures:\n{shown}\nFix the program or teacher, or raise max_errors to tolerate more.")


def _finish(run: RunDir, *, paths: dict, results: dict, n_examples: int, started: float,
            fresh: set[tuple[str, int]], keys: list[str], reused: int) -> BootstrapResult:
    calls, failures, summary = [], [], BootstrapSummary(examples=n_examples, reused=reused)
    kept_examples = set()
    counted: set[tuple[str, int]] = set()  # an example given twice was asked once
    for key in sorted(results):
        result = results[key]
        store_key = (keys[key[0]], key[1])
        if store_key in fresh and store_key not in counted:
            summary.teacher_calls += result.get("teacher_calls", 0)
            counted.add(store_key)
        if result.get("node"):
            summary.nodes[result["node"]] = summary.nodes.get(result["node"], 0) + 1
        if "failure" in result:
            failures.append(FailureRecord(**result["failure"]))
            continue
        summary.unattributed += result.get("unattributed", 0)
        if result["kept"]:
            kept_examples.add(key[0])
        for record in result["calls"]:
            call = CallRecord(**record)
            calls.append(call)
            if call.kept:
                summary.per_predictor[call.predictor] = summary.per_predictor.get(call.predictor, 0) + 1
    summary.kept = len(kept_examples)
    summary.failed = len({f.example_index for f in failures})
    summary.rejected = len({k[0] for k, r in results.items() if "failure" not in r} - kept_examples
                           - {f.example_index for f in failures})
    summary.calls = len(calls)
    summary.seconds = round(time.time() - started, 3)
    write_jsonl(paths["calls"], (c.to_dict() for c in calls))
    write_jsonl(paths["failures"], (f.to_dict() for f in failures))
    write_json(paths["summary"], summary.to_json())  # last: its presence marks the stage done
    return BootstrapResult(calls, failures, summary)


def invalidate_changed(run: RunDir, previous: dict[str, Any] | None, inputs: dict[str, Any]) -> list[str]:
    """Drops the bootstrap results of `run` that other inputs produced; returns (and logs) what changed.

    A run directory reached with other inputs (a fixed `run_name`) must not train on its old
    traces. The bootstrap of a split whose traces' identity or examples changed is redone from
    the trace store (only examples new to it call the teacher); the data files are always
    rebuilt, and a model trained on other data or options is retrained by the finetune stage.
    """
    changes: list[str] = []
    stale: set[str] = set()
    if previous is None:
        changes.append("its config.json records no inputs (an older bootfinetune): bootstrapping it again")
        stale = {"train", "val"}
    else:
        parts = identity_changes(previous.get("trace_parts", {}), inputs["trace_parts"])
        if parts:
            changes.append(f"the teacher traces' inputs changed ({', '.join(parts)}): new trace identity "
                           f"{inputs['traces']}")
            stale = {"train", "val"}
        for split, name in (("train", "trainset"), ("val", "valset")):
            diff = example_changes(previous.get("examples", {}).get(split, []), inputs["examples"][split])
            if diff:
                changes.append(f"{name} changed: {diff}")
                stale.add(split)
        if previous.get("adapter") != inputs["adapter"]:
            changes.append(f"adapter {previous.get('adapter')} -> {inputs['adapter']}: data rebuilt")
        old_options = previous.get("options", {})
        options = [f"{k} {old_options.get(k)!r} -> {v!r}" for k, v in inputs["options"].items()
                   if k in old_options and old_options[k] != v]
        if options:
            changes.append(f"options changed: {', '.join(options)}")
    if not changes:
        return changes
    for split in stale:
        bootstrap_paths(run, split)["summary"].unlink(missing_ok=True)
    logger.warning("run %s was made from other inputs: %s. %s", run.name, "; ".join(changes),
                   "Re-bootstrapping " + " and ".join(sorted(stale)) + " from the trace store (only examples "
                   "new to it call the teacher); models trained on other data or options are retrained."
                   if stale else "Models trained on other data or options are retrained; the traces are kept.")
    return changes
