"""Stage 2: run the teacher program over a set of examples on Ray Data and keep its traces.

The driver turns the examples of every split to bootstrap (trainset and valset together: one actor pool
serves both) into a Ray Dataset of plain rows (`example_index`, `split`, the example as JSON) and maps
them with `StreamingTeacherRunner` (`bootfinetune.stages.runner`), a callable class that Ray Data runs in
a pool of actors. Each actor holds the teacher programs and keeps `num_threads` examples in flight, one
slot each, on an event loop (programs with `aforward`) or threads (programs with only `forward`). Every
trace step is attributed to its predictor by name, so a predictor called twice (a loop) gives two
records and one never called (a branch) gives none.

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
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import dspy

from bootfinetune.config import BootstrapConfig
from bootfinetune.errors import BootstrapError
from bootfinetune.runtime.console import ProgressLine
from bootfinetune.run.records import CallRecord, FailureRecord, example_to_json
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import BootstrapSummary
from bootfinetune.stages.ratelimit import start_budget, stop_budget
from bootfinetune.stages.retries import BlockErrors, bounded_retries, worker_died
from bootfinetune.stages.runner import (StreamingTeacherRunner, TeacherRunner, add_usage, choose_engine, is_kept,
                                        pack_for_actors, score_value)
from bootfinetune.run.trace_store import TraceStore
from bootfinetune.stages.traces import example_changes, example_key, identity_changes, restamp
from bootfinetune.runtime.placement import ray_options
from bootfinetune.runtime.user_code import ship_user_modules
from bootfinetune.runtime.worker_pickle import dumps
from bootfinetune.training.tracking import actor_callbacks

__all__ = ["TeacherRunner", "is_kept", "score_value", "driver_settings", "run_bootstrap", "run_bootstrap_splits",
           "run_examples", "load_bootstrap", "invalidate_changed", "BootstrapResult"]

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
                dumps(value)
            except Exception as exc:  # cloudpickle raises many types; the setting stays behind, said once
                if name not in _WARNED:
                    _WARNED.add(name)
                    logger.warning("dspy.configure(%s=...) cannot be sent to Ray actors (%s: %s); it does not hold "
                                   "inside them. Make it picklable to carry it.", name, type(exc).__name__, exc)
                continue
        carried[name] = value
    if carried.get("callbacks"):
        carried["callbacks"] = actor_callbacks(carried["callbacks"])  # MLflow's stays on the driver
    return carried


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
    finished = run.read_bootstrap(split)
    if finished is None:
        return None
    calls, failures, summary = finished
    return BootstrapResult([CallRecord(**r) for r in calls], [FailureRecord(**r) for r in failures], summary,
                           resumed=True)


def run_bootstrap(run: RunDir, *, examples: list[dspy.Example], split: str = "train",
                  **kwargs: Any) -> BootstrapResult:
    """`run_bootstrap_splits` for one split: `examples` go to bootstrap/{split}.*."""
    return run_bootstrap_splits(run, splits={split: examples}, **kwargs)[split]


def run_bootstrap_splits(run: RunDir, *, splits: dict[str, list[dspy.Example]], teachers: list[dspy.Module],
                         metric: Callable | None, config: BootstrapConfig,
                         teacher_settings: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
                         secrets: list[str] | None = None, store: TraceStore | None = None
                         ) -> dict[str, BootstrapResult]:
    """Runs the teachers over the examples the trace store lacks, on Ray Data, or reads finished splits back.

    Every split still to do goes through one dataset and one actor pool, so the pool starts once for
    the trainset and the valset; an example in two splits calls the teacher once.

    Args:
        run: The run directory; results go to bootstrap/{split}.*.
        splits: {"train": examples, "val": examples}: each in its original order (`example_index` is
            the position).
        teachers: Teacher programs (checked beforehand).
        metric: `metric(example, prediction, trace)` or None.
        config: Actors, threads, batch size, engine, max_errors, threshold.
        teacher_settings: Applied with dspy.context while teachers run.
        settings: Driver settings to apply in actors; defaults to the current dspy.configure ones.
        secrets: Strings to redact from failure messages.
        store: The trace store shared by runs with the same trace identity; None keeps one
            private to this run directory (bootstrap/store/).

    Raises:
        BootstrapError: when more than `config.max_errors` examples of a split failed.
    """
    out = {split: done for split in splits if (done := _finished_earlier(run, split)) is not None}
    todo = {split: examples for split, examples in splits.items() if split not in out}
    if not todo:
        return out
    started = time.time()
    store = store or TraceStore(run.bootstrap_dir / "store")
    keys = {split: [example_key(ex) for ex in examples] for split, examples in todo.items()}
    stored = store.load()
    teacher_ids = range(len(teachers))
    first_of = _to_run(keys, stored, teacher_ids)
    budgeted = bool(config.max_calls_per_second or config.max_tokens_per_minute)
    engines = [choose_engine(t, config.num_threads, budgeted) if config.engine == "auto" else config.engine
               for t in teachers]
    fresh: dict[tuple[str, int], dict] = {}
    if first_of:
        runner_kwargs = dict(teachers=teachers, metric=metric,
                             settings=driver_settings() if settings is None else settings,
                             teacher_settings=teacher_settings or {}, num_threads=config.num_threads,
                             metric_threshold=config.metric_threshold, secrets=secrets or [], engine=config.engine,
                             max_retry_after_s=config.max_retry_after_s)
        fresh = _ask_teachers(first_of, todo, keys, stored, store, runner_kwargs, config, engines)
    for split, split_keys in keys.items():
        results = {(i, t): restamp(fresh.get((key, t)) or stored[(key, t)], i, split)
                   for i, key in enumerate(split_keys) for t in teacher_ids}
        ran = {k for k in fresh if first_of[k[0]][0] == split}
        reused = sum(all((key, t) not in ran for t in teacher_ids) for key in split_keys)
        if reused:
            logger.info("bootstrap[%s]: %d of %d example(s) read from the trace store %s; %d sent to the teacher",
                        split, reused, len(split_keys), store.location, len(split_keys) - reused)
        out[split] = _finish(run, split=split, results=results, n_examples=len(split_keys),
                             started=started, fresh=ran, keys=split_keys, reused=reused,
                             engine="+".join(engines) if ran else "")
    return {split: out[split] for split in splits}


def _to_run(keys: dict[str, list[str]], stored: dict[tuple[str, int], dict], teacher_ids: range
            ) -> dict[str, tuple[str, int]]:
    """Example key -> (split, index) of its first place, for each example the store lacks a teacher's result of;
    an example given twice (in one split or two) runs once."""
    first_of: dict[str, tuple[str, int]] = {}
    for split, split_keys in keys.items():
        for i, key in enumerate(split_keys):
            if any((key, t) not in stored for t in teacher_ids):
                first_of.setdefault(key, (split, i))
    return first_of


def _finished_earlier(run: RunDir, split: str) -> BootstrapResult | None:
    """A split this run finished before, read back (its teacher not called again), or None."""
    done = load_bootstrap(run, split)
    if done is not None:
        logger.info("bootstrap[%s]: finished earlier, read back from %s (teacher not called)", split, run.root)
    return done


def _ask_teachers(first_of: dict[str, tuple[str, int]], todo: dict[str, list[dspy.Example]],
                  keys: dict[str, list[str]], stored: dict[tuple[str, int], dict], store: TraceStore,
                  runner_kwargs: dict[str, Any], config: BootstrapConfig, engines: list[str]
                  ) -> dict[tuple[str, int], dict]:
    """Runs the teachers over the examples `first_of` names, on one actor pool, appending each result to the
    trace store as it arrives; returns the new results by (example key, teacher).

    Raises:
        BootstrapError: once more than `config.max_errors` examples of a split failed.
    """
    teachers = runner_kwargs["teachers"]
    if config.num_threads > HTTP_POOL:
        logger.warning("bootstrap: num_threads=%d slots per actor, but DSPy's HTTP client keeps at most %d connections "
                       "per LM in a process: the extra calls wait for one. Use more actors (num_actors) instead.",
                       config.num_threads, HTTP_POOL)
    logger.info("bootstrap: %d example(s) to the teacher (%s) on %d actor(s) x %d slots; engine: %s",
                len(first_of), ", ".join(f"{s} {sum(j[0] == s for j in first_of.values())}" for s in todo),
                config.num_actors, config.num_threads,
                ", ".join(f"{type(t).__name__} {e}" for t, e in zip(teachers, engines)))
    runner_kwargs = {**runner_kwargs, "budget": start_budget(config.max_calls_per_second, config.max_tokens_per_minute)}
    fresh: dict[tuple[str, int], dict] = {}
    failures = dict.fromkeys(todo, 0)
    progress = ProgressLine("bootstrap", len(first_of) * len(teachers), unit="teacher runs")  # no terminal
    try:
        with store.appender(config.trace_upload_every, config.trace_upload_s) as appender:
            for split, index, teacher, result in run_jobs(
                    list(first_of.values()), todo, runner_kwargs, num_actors=config.num_actors,
                    batch_size=config.batch_size, num_cpus=config.actor_cpus):
                progress.advance()
                key = keys[split][index]
                if (key, teacher) in stored:  # another teacher's result for this example was missing
                    continue
                fresh[(key, teacher)] = result
                appender.add(key, teacher, result)
                if "failure" in result:  # a "WorkerDied" example counts like any other failure
                    failures[split] += 1
                    if failures[split] > config.max_errors:
                        mine = {k: r for k, r in fresh.items() if first_of[k[0]][0] == split}
                        raise BootstrapError(_too_many_errors(mine, config.max_errors, split))
    finally:
        store.push_own_results()
        stop_budget(runner_kwargs["budget"])
    return fresh


HTTP_POOL = 100
"""Connections DSPy's HTTP clients keep per LM and process (lm15's and LiteLLM's default): slots past it wait."""
POOL_START_TIMEOUT_S = 600  # seconds for the actor pool to start before the run fails, naming the resources
RESULT_BLOCK_BYTES = 64 << 10
"""Results a Ray Data task hands back at a time (a few examples of a real program's traces)."""
ACTOR_CALLS = 2
"""Ray Data tasks an actor runs (and holds) at once: the next task's examples take the slots a finishing one
frees. No more are queued on an actor: Ray Data sends blocks to the actor beside their data while it has room,
so a deeper queue lets the driver's node take a small dataset's every block."""


def run_examples(indices: list[int], examples: list[dspy.Example], runner_kwargs: dict[str, Any], *,
                 num_actors: int, batch_size: int, num_cpus: float,
                 resources: dict[str, float] | None = None) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """`run_jobs` over one list of examples; yields (example_index, teacher, result)."""
    split = runner_kwargs.get("split", "train")
    for _, index, teacher, result in run_jobs([(split, i) for i in indices], {split: examples}, runner_kwargs,
                                              num_actors=num_actors, batch_size=batch_size, num_cpus=num_cpus,
                                              resources=resources):
        yield index, teacher, result


def run_jobs(jobs: list[tuple[str, int]], examples: dict[str, list[dspy.Example]], runner_kwargs: dict[str, Any], *,
             num_actors: int, batch_size: int, num_cpus: float,
             resources: dict[str, float] | None = None) -> Iterator[tuple[str, int, int, dict[str, Any]]]:
    """Runs the runner over the examples `(split, index)` on Ray Data; yields (split, example_index, teacher, result).

    Every (example, teacher) is yielded once, as results arrive: in batches first; then the examples a dead
    worker took with it run again alone, and one whose worker dies alone too is yielded as a "WorkerDied"
    failure (`bootfinetune.stages.retries`).
    """
    import ray

    teachers = range(len(runner_kwargs["teachers"]))
    slots = max(1, int(runner_kwargs.get("num_threads", 8)))
    # Enough examples per batch that the batches an actor holds at once keep all its slots busy.
    batch_size = max(batch_size, math.ceil(slots / 2))
    seen: set[tuple[str, int, int]] = set()
    pending, errors = list(jobs), BlockErrors()
    for alone in (False, True):
        if not pending:
            return
        if alone:
            logger.warning("bootstrap: %d example(s) were in batches whose worker died; running them one per task "
                           "to find the one that kills it", len(pending))
        rows = [{"example_index": i, "split": s, "example": example_to_json(examples[s][i])} for s, i in pending]
        # Blocks of a few batches each: a task's results reach the driver (and the trace store) when it ends.
        blocks = len(rows) if alone else min(len(rows), max(num_actors * 4, math.ceil(len(rows) / (4 * batch_size))))
        mapped = map_teacher_runner(ray.data.from_items(rows, override_num_blocks=blocks), runner_kwargs,
                                    num_actors=min(num_actors, len(rows)) if alone else num_actors,
                                    batch_size=1 if alone else batch_size, num_cpus=num_cpus, max_tasks=blocks,
                                    one_at_a_time=alone, resources=resources)
        errors = BlockErrors()
        with errors.attached():
            for row in mapped.iter_rows():
                done = (str(row["split"]), int(row["example_index"]), int(row["teacher"]))
                if done not in seen:  # a batch re-run after its worker died may bring some back twice
                    seen.add(done)
                    yield done[0], done[1], done[2], json.loads(row["result"])
        pending = [(s, i) for s, i in pending if any((s, i, t) not in seen for t in teachers)]
    for s, i in pending:
        for t in teachers:
            if (s, i, t) not in seen:
                yield s, i, t, worker_died(i, t, s, errors.last, runner_kwargs.get("secrets") or [])


def map_teacher_runner(dataset: Any, runner_kwargs: dict[str, Any], *, num_actors: int, batch_size: int,
                       num_cpus: float, max_tasks: int, one_at_a_time: bool = False,
                       resources: dict[str, float] | None = None) -> Any:
    """`dataset.map_batches(StreamingTeacherRunner)` on a pool of actors: where user objects are handed to Ray.

    The user's own modules (programs, metrics, retrievers, callbacks defined beside the driver) go with
    them as files (`user_code.ship_user_modules`), imported by each actor before it unpickles the
    objects, so the actors need not find them on their path. Retries are
    bounded (`bootfinetune.stages.retries`): a task that failed all its attempts is dropped rather than
    failing the run, so its rows are missing from the output (results are keyed by example).

    Args:
        max_tasks: An upper bound on the tasks (the dataset's blocks), which bounds actor restarts.
        one_at_a_time: One task per actor at a time, so a worker's death takes no queued task with it.
        resources: Ray resources per actor instead of `num_cpus` alone (`runtime.placement.worker_resources`):
            actors that run the finetuned models hold what a training worker held.
    """
    import ray

    code = ship_user_modules()
    placement = ray_options(resources) if resources else {"num_cpus": num_cpus}
    calls = 1 if one_at_a_time else ACTOR_CALLS
    # Dispatch only once every actor of the pool is up: otherwise the first actor ready takes all the
    # blocks of a small trainset while the others (often on other nodes) are still importing DSPy.
    dataset.context.wait_for_min_actors_s = max(dataset.context.wait_for_min_actors_s, POOL_START_TIMEOUT_S)
    # Results go back to the driver (and the trace store) once RESULT_BLOCK_BYTES of them are done, not with the
    # rest of their task: a driver killed mid-run loses that much a task, not whole tasks. (A block a result
    # costs the driver ~6 ms each, too much for a fast teacher.)
    dataset.context.target_max_block_size = RESULT_BLOCK_BYTES
    with warnings.catch_warnings():
        # Ray 2.60 takes an actor's max_restarts / max_task_retries only as `ray_remote_args`, which it warns
        # are deprecated: they are what bounds the retries (test_worker_faults.py fails if they stop applying).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return dataset.map_batches(StreamingTeacherRunner,
                                   fn_constructor_kwargs={**pack_for_actors(runner_kwargs), "code": code},
                                   compute=ray.data.ActorPoolStrategy(
                                       size=num_actors, max_tasks_in_flight_per_actor=calls,
                                       max_concurrent_calls_per_actor=calls),
                                   batch_size=batch_size, **placement,
                                   **bounded_retries(dataset.context, max_tasks))


def _too_many_errors(results: dict, max_errors: int, split: str) -> str:
    failed = sorted((r["failure"] for r in results.values() if "failure" in r), key=lambda f: f["example_index"])
    shown = "\n".join(f"  example {f['example_index']}: {f['error_type']}: {f['message'][:300]}" for f in failed[:3])
    return (f"bootstrap[{split}] stopped: {len(failed)} examples failed, more than max_errors={max_errors}. "
            f"First failures:\n{shown}\nFix the program or teacher, or raise max_errors to tolerate more.")


def _finish(run: RunDir, *, split: str, results: dict, n_examples: int, started: float,
            fresh: set[tuple[str, int]], keys: list[str], reused: int, engine: str = "") -> BootstrapResult:
    calls, failures, summary = [], [], BootstrapSummary(examples=n_examples, reused=reused, engine=engine)
    kept_examples = set()
    counted: set[tuple[str, int]] = set()  # an example given twice was asked once
    for key in sorted(results):
        result = results[key]
        store_key = (keys[key[0]], key[1])
        if store_key in fresh and store_key not in counted:
            summary.teacher_calls += result.get("teacher_calls", 0)
            add_usage(summary.usage, result.get("usage") or {})
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
    run.write_bootstrap(split, (c.to_dict() for c in calls), (f.to_dict() for f in failures), summary)
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
        run.forget_bootstrap(split)
    logger.warning("run %s was made from other inputs: %s. %s", run.name, "; ".join(changes),
                   "Re-bootstrapping " + " and ".join(sorted(stale)) + " from the trace store (only examples "
                   "new to it call the teacher); models trained on other data or options are retrained."
                   if stale else "Models trained on other data or options are retrained; the traces are kept.")
    return changes
