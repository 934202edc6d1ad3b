"""Stage 6: the user's metric on the valset, for the base student, the teacher and the compiled program.

Small valsets run in this process with threads (the finetuned LM batches concurrent calls
into one `generate`); large ones are spread over Ray Data actors, each loading the model
once. The teacher's score needs no new calls: the valset was bootstrapped through the
teacher already, and those traces carry the metric's scores.

The base student answers as its finetuned self will (`rebind.base_limits`). An answer cut at its token limit
is counted (`usage[model]["cut"]`, from each call's finish reason) instead of DSPy warning once per call.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import dspy

from bootfinetune.stages.bootstrap import BootstrapResult, TeacherRunner, driver_settings, run_examples, score_value
from bootfinetune.stages.runner import add_usage
from bootfinetune.run.records import example_to_json
from bootfinetune.runtime.console import counted_cuts

RAY_EVAL_MIN_EXAMPLES = 256
"""Valsets at least this large are evaluated on Ray Data actors."""


@dataclass
class EvalResult:
    """A program's metric over a valset."""

    score: float | None
    """Mean metric (failed examples count 0); None without a metric."""
    examples: int
    """Examples evaluated."""
    failed: int
    """Examples whose run or metric raised."""
    seconds: float
    """Wall time."""
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The program's LM usage by model: {"calls", "prompt_tokens", "completion_tokens", "cost_usd"} (cost None
    where DSPy knows no price, as for a finetuned model), and "cut": answers that stopped at their token
    limit (absent when none did); cache hits spend nothing and are not counted."""


def _score(value: Any) -> float:
    value = score_value(value)
    return 0.0 if value is None else float(value)


def evaluate_program(program: dspy.Module, examples: list[dspy.Example], metric: Callable | None, *,
                     num_threads: int = 8, num_actors: int = 2, actor_cpus: float = 1.0,
                     use_ray: bool | None = None) -> EvalResult:
    """Runs `program` over `examples` and averages `metric(example, prediction, trace)`."""
    started = time.time()
    if metric is None or not examples:
        return EvalResult(None, len(examples or []), 0, 0.0)
    use_ray = len(examples) >= RAY_EVAL_MIN_EXAMPLES if use_ray is None else use_ray
    batch = {"example_index": list(range(len(examples))), "example": [example_to_json(e) for e in examples]}
    # Threads, as before the bootstrap engine chose per program: a finetuned LM batches the calls of its threads.
    kwargs = dict(teachers=[program], metric=metric, settings=driver_settings(), num_threads=num_threads,
                  engine="threads")
    if use_ray:
        from bootfinetune.runtime.ray_env import ensure_ray

        ensure_ray()  # run alone (not from compile), it joins or starts Ray with the workers' environment
        # An example that kills its worker every time is a failure (scores 0); the others of its batch count.
        results = [result for _, _, result in run_examples(list(range(len(examples))), examples, kwargs,
                                                           num_actors=num_actors, batch_size=max(num_threads, 8),
                                                           num_cpus=actor_cpus)]
    else:
        with counted_cuts():
            results = [json.loads(r) for r in TeacherRunner(**kwargs)(batch)["result"]]
    failed = sum("failure" in r for r in results)
    total = sum(_score(r.get("score")) for r in results if "failure" not in r)
    usage: dict[str, dict[str, Any]] = {}
    for r in results:
        add_usage(usage, r.get("usage") or {})
    return EvalResult(round(total / len(examples), 6), len(examples), failed, round(time.time() - started, 3), usage)


def teacher_score(val: BootstrapResult | None, metric: Callable | None) -> float | None:
    """The teacher's metric on the valset, read from its valset traces (failures count 0)."""
    if val is None or metric is None or not val.summary.examples:
        return None
    per_example: dict[int, float] = {}
    for call in val.calls:
        if call.teacher == 0:
            per_example[call.example_index] = _score(call.score)
    return round(sum(per_example.values()) / val.summary.examples, 6)

