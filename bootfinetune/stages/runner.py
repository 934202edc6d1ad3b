"""The callable class that runs teacher programs over examples inside each bootstrap actor.

Examples stream through an actor with one slot per example in flight (`num_threads` slots, shared by
every batch the actor holds): a finished example frees its slot at once and the next example, of
this batch or another, takes it. There is no batch barrier on the slots; a batch's results go back
together once its last example is done, while the actor's other batches keep the slots busy.

Two engines, chosen per program by `choose_engine` and reported (log line, `BootstrapSummary.engine`):

- "async": the program's class defines `aforward` for its own `forward` (dspy.Predict,
  dspy.ChainOfThought, or a module that writes both) and the actor keeps at least `ASYNC_MIN_SLOTS`
  examples in flight: it runs as a coroutine (`acall`) on the actor's event loop, so a slot costs no thread;
- "threads": otherwise (only `forward`, the common user module; or fewer slots, where threads cost less
  CPU per call; or under a teacher budget): it runs on `num_threads` threads, handed out from the same
  event loop.

A metric always runs on a thread (it may call an LM itself and must not stall the loop).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import dspy
from dspy.clients.base_lm import BaseLM

from bootfinetune.common.redaction import redact
from bootfinetune.config import DEFAULT_TEACHER_TIMEOUT, BootstrapConfig
from bootfinetune.run.records import CallRecord, FailureRecord, example_from_json, to_jsonable
from bootfinetune.stages.ratelimit import (RATE_LIMIT_RETRIES, BudgetCallback, Pacer, cap_dspy_retry_waits,
                                           rate_limited)
from bootfinetune.runtime.ray_env import WORKER_ENV
from bootfinetune.runtime.user_code import UserCode, install
from bootfinetune.runtime.worker_pickle import ModuleObjectsByReference
from bootfinetune.training.distributed import node_id

ENGINES = ("auto", "async", "threads")


def engine_of(program: Any) -> str:
    """"async" when the program's `aforward` is as specific as its `forward` (it is not an inherited
    `aforward` that a subclass's own `forward` overrides), else "threads".

    >>> import dspy
    >>> class OnlyForward(dspy.Module):
    ...     def forward(self, question): ...
    >>> class Both(OnlyForward):
    ...     async def aforward(self, question): ...
    >>> class PredictWithForward(dspy.Predict):
    ...     def forward(self, **kwargs): ...
    >>> [engine_of(p) for p in (dspy.Predict("q -> a"), OnlyForward(), Both(), PredictWithForward("q -> a"))]
    ['async', 'threads', 'async', 'threads']
    """
    mro = type(program).__mro__
    forward = next((i for i, cls in enumerate(mro) if "forward" in cls.__dict__), None)
    aforward = next((i for i, cls in enumerate(mro) if "aforward" in cls.__dict__), None)
    return "async" if aforward is not None and (forward is None or aforward <= forward) else "threads"


ASYNC_MIN_SLOTS = 33
"""Slots per actor from which "auto" runs a program that has `aforward` on the event loop; below, on threads."""


def choose_engine(program: Any, slots: int, budgeted: bool = False) -> str:
    """The engine "auto" picks: "async" for a program with `aforward` (`engine_of`) when an actor keeps at
    least `ASYNC_MIN_SLOTS` examples in flight, else "threads"; always threads under a teacher budget, whose
    callback blocks the thread of each call while it waits.

    >>> import dspy
    >>> [choose_engine(dspy.Predict("q -> a"), n) for n in (16, 64)], choose_engine(dspy.Predict("q -> a"), 64, True)
    (['threads', 'async'], 'threads')
    """
    if budgeted:
        return "threads"
    return "async" if slots >= ASYNC_MIN_SLOTS and engine_of(program) == "async" else "threads"


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


class TeacherUsage:
    """One example's teacher calls, their tokens and their cost, by model, as DSPy itself reports them.

    Set per example as `dspy.context(usage_tracker=usage, caller_modules=[usage])`: DSPy hands a usage
    tracker each answered call's usage (`add_usage`; a cache hit is not handed over, so `calls` counts what
    a provider answered), and then appends the call's history entry, with the cost its pricing estimated
    (None for a model it has no price for), to the history of every module calling, this one first. No
    callback is needed, which would make DSPy inspect the arguments of every module, adapter and LM call.
    A program that opens its own `dspy.track_usage()` hides its calls inside it from this count.

    With `dspy.configure(track_usage=True)` DSPy gives each prediction its usage only from a tracker of its
    own, so then (`from_history`) this one is not set as the tracker and reads each call's usage from its
    history entry instead (an entry with no usage is a cache hit).
    """

    def __init__(self, pacer: Pacer | None = None, from_history: bool = False):
        self.calls = 0
        self.by_model: dict[str, dict[str, Any]] = {}
        self.pacer = pacer
        self.history = _CostLog(self)
        self.from_history = from_history
        self._billed: str | None = None  # the model of the call just answered, until its history entry comes

    def add_usage(self, lm: str, usage_entry: dict[str, Any] | None) -> None:
        self.calls += 1
        totals = self.by_model.setdefault(str(lm), {"calls": 0, "cost_usd": 0.0})
        totals["calls"] += 1
        tokens = 0
        for key in ("prompt_tokens", "completion_tokens"):
            value = (usage_entry or {}).get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0) + value
                tokens += value
        self._billed = str(lm)
        if self.pacer is not None:
            self.pacer.after_call(tokens)

    def __deepcopy__(self, memo: dict) -> TeacherUsage:
        return self  # dspy.Parallel copies the tracker per thread: the example's calls there count here too

    def add_cost(self, entry: dict[str, Any]) -> None:
        if self.from_history and entry.get("usage"):
            self.add_usage(str(entry.get("model")), entry["usage"])
        model, self._billed = self._billed, None
        if model is None or model not in self.by_model:  # a cache hit: its cost was paid before
            return
        totals, cost = self.by_model[model], entry.get("cost")
        if cut_short(entry):
            totals["cut"] = totals.get("cut", 0) + 1
        if totals["cost_usd"] is not None:
            totals["cost_usd"] = None if cost is None else totals["cost_usd"] + float(cost)


def cut_short(entry: dict[str, Any]) -> bool:
    """Whether a DSPy history entry's answer stopped at its token limit (finish reason "length")."""
    response = entry.get("response")
    for item in response if isinstance(response, (list, tuple)) else [response]:
        choices = getattr(item, "choices", None) or (item.get("choices") if isinstance(item, dict) else None)
        for choice in choices or [item]:
            reason = choice.get("finish_reason") if isinstance(choice, dict) else getattr(choice, "finish_reason", None)
            if reason == "length":
                return True
    return False


class _CostLog(list):
    """A history DSPy appends a call's entry to (as it does a calling module's): keeps only its cost."""

    def __init__(self, usage: TeacherUsage):
        super().__init__()
        self.usage = usage

    def append(self, entry: Any) -> None:
        if isinstance(entry, dict):
            self.usage.add_cost(entry)


class TeacherRunner:
    """Runs the teachers over a batch of examples: `runner(batch)` here, `StreamingTeacherRunner` in Ray Data.

    >>> runner = TeacherRunner([program], metric=None, settings={"lm": lm})      # doctest: +SKIP
    >>> runner({"example_index": [0], "example": [example_to_json(ex)]})         # doctest: +SKIP
    {'example_index': [0], 'teacher': [0], 'split': ['train'], 'result': ['{"calls": [...], ...}']}

    Args:
        teachers: Teacher programs; each runs every example and their traces are pooled.
        metric: `metric(example, prediction, trace)`, or None to keep every trace.
        settings: Driver `dspy.configure` settings (`driver_settings()`) to apply here.
        teacher_settings: Settings applied while the teacher runs, e.g. {"lm": big_lm}.
        num_threads: Examples in flight at once in this actor (its slots).
        metric_threshold: For float scores: keep when score >= threshold.
        secrets: Strings to redact from error messages.
        split: "train" or "val", copied into each record of a batch without a "split" column.
        engine: "auto" (`choose_engine` for each teacher), "async" or "threads".
        budget: The run's `TeacherBudget` actor (`bootfinetune.stages.ratelimit`), or None.
        max_retry_after_s: The longest wait a teacher's Retry-After imposes (DSPy's retries, and the pacer's pause).
    """

    def __init__(self, teachers: list[dspy.Module], metric: Callable | None = None,
                 settings: dict[str, Any] | None = None, teacher_settings: dict[str, Any] | None = None,
                 num_threads: int = 8, metric_threshold: float | None = None,
                 secrets: list[str] | None = None, split: str = "train", engine: str = "auto",
                 budget: Any = None, max_retry_after_s: float = BootstrapConfig.max_retry_after_s):
        for name, value in WORKER_ENV.items():
            os.environ.setdefault(name, value)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        self.teachers = teachers
        self.metric = metric
        self.context = {**(settings or {}), **(teacher_settings or {})}
        self.metric_threshold = metric_threshold
        self.secrets = secrets or []
        self.split = split
        self.engines = [choose_engine(t, num_threads, budget is not None) if engine == "auto" else engine
                        for t in teachers]
        self.names = [{id(p): n for n, p in t.named_predictors()} for t in teachers]
        self.num_threads = num_threads
        self.pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="teacher")
        self.pacer = Pacer(budget, num_threads, max_pause=max_retry_after_s)
        cap_dspy_retry_waits(max_retry_after_s)
        self.callbacks = [BudgetCallback(self.pacer)] if budget is not None else []
        self._slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its semaphore
        self.node = node_id()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Runs a batch to the end from synchronous code (an event loop of its own, on a helper thread)."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-loop") as loop_thread:
            return loop_thread.submit(asyncio.run, self.run_batch(batch)).result()

    async def run_batch(self, batch: dict[str, Any]) -> dict[str, list]:
        """Runs every (example, teacher) of the batch, each in a slot of the actor as one frees up."""
        splits = batch.get("split")
        jobs = [(int(i), str(e), t, str(splits[k]) if splits is not None else self.split)
                for k, (i, e) in enumerate(zip(batch["example_index"], batch["example"]))
                for t in range(len(self.teachers))]
        results = await asyncio.gather(*(self._in_slot(*job) for job in jobs))
        return {"example_index": [j[0] for j in jobs], "teacher": [j[2] for j in jobs],
                "split": [j[3] for j in jobs], "result": [json.dumps(r, ensure_ascii=False) for r in results]}

    async def _in_slot(self, example_index: int, example_json: str, teacher: int, split: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        slots = self._slots.get(loop)
        if slots is None:
            slots = self._slots[loop] = asyncio.Semaphore(self.num_threads)
        async with slots:
            spent: dict[str, dict[str, int]] = {}
            for attempt in range(RATE_LIMIT_RETRIES + 1):
                await self.pacer.admit()
                result: dict[str, Any] = {}
                try:
                    if self.engines[teacher] == "async":
                        result = await self.arun_one(example_index, example_json, teacher, split)
                    else:
                        result = await loop.run_in_executor(self.pool, self.run_one, example_index, example_json,
                                                            teacher, split)
                finally:  # a cancelled slot frees its place too
                    retry_after = result.pop("_rate_limited", None)
                    await self.pacer.release(retry_after)
                add_usage(spent, result.get("usage") or {})
                if retry_after is None or attempt == RATE_LIMIT_RETRIES:
                    break
            result["usage"] = spent  # every attempt's calls were made (and paid)
            result["teacher_calls"] = sum(u.get("calls", 0) for u in spent.values())
            return result

    def _start(self, example_json: str) -> tuple[dspy.Example, TeacherUsage, list, dict[str, Any]]:
        tracked = self.context.get("track_usage", dspy.settings.track_usage)
        usage, trace = TeacherUsage(self.pacer, from_history=bool(tracked)), []
        context = {**self.context, "trace": trace, "caller_modules": [usage]}
        if not tracked:
            context["usage_tracker"] = usage
        if self.callbacks:
            context["callbacks"] = list(self.context.get("callbacks") or dspy.settings.callbacks or []) + self.callbacks
        return example_from_json(example_json), usage, trace, context

    def run_one(self, example_index: int, example_json: str, teacher_index: int,
                split: str | None = None) -> dict[str, Any]:
        """Runs one teacher on one example (its `forward`); returns {"calls": [...]} or {"failure": {...}}."""
        example, usage, trace, context = self._start(example_json)
        stage = "program"
        try:
            with dspy.context(**context):
                prediction = self.teachers[teacher_index](**example.inputs())
                stage = "metric"
                score = self.metric(example, prediction, trace) if self.metric else None
        except Exception as exc:  # any failure of the user's program or metric becomes a failure record
            return self._failure(example_index, teacher_index, split or self.split, stage, exc, usage)
        return self._records(example_index, teacher_index, split or self.split, trace, score, usage)

    async def arun_one(self, example_index: int, example_json: str, teacher_index: int,
                       split: str | None = None) -> dict[str, Any]:
        """`run_one` through the program's `acall`; the metric runs on a thread with the same settings."""
        example, usage, trace, context = self._start(example_json)
        stage = "program"
        try:
            with dspy.context(**context):
                prediction = await self.teachers[teacher_index].acall(**example.inputs())
                stage = "metric"
                score = None
                if self.metric:
                    run = contextvars.copy_context().run
                    score = await asyncio.get_running_loop().run_in_executor(
                        self.pool, run, self.metric, example, prediction, trace)
        except Exception as exc:  # any failure of the user's program or metric becomes a failure record
            return self._failure(example_index, teacher_index, split or self.split, stage, exc, usage)
        return self._records(example_index, teacher_index, split or self.split, trace, score, usage)

    def _failure(self, example_index: int, teacher: int, split: str, stage: str, exc: Exception,
                 usage: TeacherUsage) -> dict[str, Any]:
        failure = FailureRecord(example_index=example_index, error_type=type(exc).__name__,
                                message=redact(str(exc), self.secrets)[:2000], teacher=teacher,
                                split=split, stage=stage)
        out = {"failure": failure.to_dict(), "teacher_calls": usage.calls, "usage": usage.by_model, "node": self.node}
        if stage == "program" and rate_limited(exc) is not None:
            out["_rate_limited"] = rate_limited(exc)  # `_in_slot` runs the example again after Retry-After
        return out

    def _records(self, example_index: int, teacher: int, split: str, trace: list, score: Any,
                 usage: TeacherUsage) -> dict[str, Any]:
        kept = is_kept(score, self.metric_threshold)
        calls, unattributed, names = [], 0, self.names[teacher]
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
                score=score_value(score), kept=kept, teacher=teacher, split=split,
            ).to_dict())
        return {"calls": calls, "kept": kept, "score": score_value(score), "teacher_calls": usage.calls,
                "usage": usage.by_model, "unattributed": unattributed, "node": self.node}


def add_usage(total: dict[str, dict[str, Any]], usage: dict[str, dict[str, Any]]) -> None:
    """Adds `usage` ({model: {calls, prompt_tokens, completion_tokens, cost_usd}}) into `total`; an unknown
    cost (None) makes the sum unknown."""
    for model, counts in usage.items():
        into = total.setdefault(model, {})
        for key, value in counts.items():
            if key not in into or into[key] is None or value is None:
                into[key] = value if key not in into else None
            else:
                into[key] += value


SHIPPED = ("teachers", "metric", "settings", "teacher_settings")
"""The runner arguments that hold user objects (and LMs): packed by `pack_for_actors`."""


def pack_for_actors(runner_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The runner's arguments as an actor gets them: the user objects packed into one pickle, every LM
    in them without its call history (`StreamingTeacherRunner` unpacks them). The user's own modules go by
    reference (`bootfinetune.runtime.worker_pickle`): the actor imports them from their shipped files.

    A `dspy.LM` pickles with its `history`, up to `max_history_size` (10,000) calls of earlier use in the
    driver: a teacher that already ran over a devset weighs megabytes, which every actor would unpickle
    to keep a history nobody reads there. A `dspy.LM` that sets no `timeout` (and whose client DSPy owns:
    not a custom engine) gets `DEFAULT_TEACHER_TIMEOUT`, the CLI's and the jobs' default, rather than
    LiteLLM's 600 s. The user's LMs themselves are left as they are.
    """
    import io

    import ray.cloudpickle

    class Packer(ModuleObjectsByReference, ray.cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            untimed = isinstance(obj, dspy.LM) and isinstance(getattr(obj, "_engine_spec", None), str) \
                and obj.kwargs.get("timeout") is None
            if isinstance(obj, BaseLM) and (getattr(obj, "history", None) or untimed):
                state = obj.__getstate__()
                if isinstance(state, dict):  # an LM class with a state of its own kind pickles as it is
                    if untimed:
                        state["kwargs"] = {**state["kwargs"], "timeout": DEFAULT_TEACHER_TIMEOUT}
                    return _lm_without_history, (type(obj), {**state, "history": []})
            return super().reducer_override(obj)

    buffer = io.BytesIO()
    Packer(buffer, protocol=5).dump({k: runner_kwargs[k] for k in SHIPPED if k in runner_kwargs})
    return {**{k: v for k, v in runner_kwargs.items() if k not in SHIPPED}, "packed": buffer.getvalue()}


def _lm_without_history(cls: type, state: dict[str, Any]) -> Any:
    lm = cls.__new__(cls)
    if getattr(cls, "__setstate__", None) is not None:
        lm.__setstate__(state)
    else:
        lm.__dict__.update(state)
    return lm


class StreamingTeacherRunner(TeacherRunner):
    """The class Ray Data runs: an async `__call__`, so Ray Data gives the actor an event loop and keeps
    several batches of a task in flight on it at once, all sharing the actor's slots.

    Built from `pack_for_actors(runner_kwargs)` and the user's modules (`user_code.ship_user_modules()`),
    which are installed on the actor's path before the packed objects are unpickled.

    (A coroutine, not an async generator yielding a row per example: Ray Data 2.60 collects an async
    generator's whole output per batch before passing it on, so per-row yields would only add a block
    conversion per row.)
    """

    def __init__(self, packed: bytes, code: UserCode | None = None, **kwargs: Any):
        import ray.cloudpickle

        install(code)  # first: unpickling imports the user's modules by name
        super().__init__(**ray.cloudpickle.loads(packed), **kwargs)

    async def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        return await self.run_batch(batch)
