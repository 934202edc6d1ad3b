"""Stage 6: the user's metric on the valset, for the base student, the teacher and the compiled program.

Where it runs (`bootfinetune.runtime.placement`): when the models were trained on an accelerator
(`use_gpu`, `resources_per_worker`), always on Ray Data actors holding one training worker's
resources, one actor per training worker, each loading the models once: the driver's head may have
no accelerator. Otherwise small valsets run in this process with threads (the finetuned LM batches
concurrent calls into one `generate`) and large ones on Ray Data actors. Each result says the node
it ran on (`EvalResult.nodes`). The teacher's score needs no new calls: the valset was bootstrapped
through the teacher already, and those traces carry the metric's scores.

While scoring, the program's finetuned LMs take up to `num_threads` prompts in one `generate` (`batches_of`),
so the threads' calls fill their batches. The base student answers as its finetuned self will
(`rebind.base_limits`). An answer cut at its token limit
is counted (`usage[model]["cut"]`, from each call's finish reason) instead of DSPy warning once per call.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import dspy

from bootfinetune.config import InferenceConfig, TrainConfig
from bootfinetune.runtime.placement import needs_accelerator, worker_resources
from bootfinetune.stages.bootstrap import BootstrapResult, TeacherRunner, driver_settings, run_examples, score_value
from bootfinetune.stages.runner import add_usage
from bootfinetune.run.records import example_to_json
from bootfinetune.runtime.console import counted_cuts
from bootfinetune.runtime.ray_env import ensure_ray
from bootfinetune.serving.lm import finetuned_engine

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
    nodes: dict[str, int] = field(default_factory=dict)
    """Examples run per Ray node (where the program's models loaded); {} when run in a process outside Ray."""


def _score(value: Any) -> float:
    value = score_value(value)
    return 0.0 if value is None else float(value)


def evaluate_program(program: dspy.Module, examples: list[dspy.Example], metric: Callable | None, *,
                     num_threads: int = InferenceConfig.eval_threads, num_actors: int = 2, actor_cpus: float = 1.0,
                     use_ray: bool | None = None, placement: TrainConfig | None = None) -> EvalResult:
    """Runs `program` over `examples` on `num_threads` threads (per actor on Ray) and averages
    `metric(example, prediction, trace)`; its finetuned LMs batch up to `num_threads` calls meanwhile.

    Args:
        placement: The training options the program's models were trained with: when its workers asked for
            an accelerator, the examples run on `num_workers` Ray actors holding one worker's resources each,
            never in this process (`use_ray` and `num_actors` are then not used).
    """
    with batches_of(program, num_threads):
        return _evaluate(program, examples, metric, num_threads, num_actors, actor_cpus, use_ray, placement)


def _evaluate(program: dspy.Module, examples: list[dspy.Example], metric: Callable | None, num_threads: int,
              num_actors: int, actor_cpus: float, use_ray: bool | None, placement: TrainConfig | None) -> EvalResult:
    started = time.time()
    if metric is None or not examples:
        return EvalResult(None, len(examples or []), 0, 0.0)
    resources = None
    if placement is not None and needs_accelerator(placement):
        resources, use_ray, num_actors = worker_resources(placement), True, placement.num_workers
    use_ray = len(examples) >= RAY_EVAL_MIN_EXAMPLES if use_ray is None else use_ray
    batch = {"example_index": list(range(len(examples))), "example": [example_to_json(e) for e in examples]}
    # Threads, as before the bootstrap engine chose per program: a finetuned LM batches the calls of its threads.
    kwargs = dict(teachers=[program], metric=metric, settings=driver_settings(), num_threads=num_threads,
                  engine="threads")
    if use_ray:
        ensure_ray()  # run alone (not from compile), it joins or starts Ray with the workers' environment
        # An example that kills its worker every time is a failure (scores 0); the others of its batch count.
        results = [result for _, _, result in run_examples(list(range(len(examples))), examples, kwargs,
                                                           num_actors=num_actors, batch_size=max(num_threads, 8),
                                                           num_cpus=actor_cpus, resources=resources)]
    else:
        with counted_cuts():
            results = [json.loads(r) for r in TeacherRunner(**kwargs)(batch)["result"]]
    failed = sum("failure" in r for r in results)
    total = sum(_score(r.get("score")) for r in results if "failure" not in r)
    usage: dict[str, dict[str, Any]] = {}
    nodes: dict[str, int] = {}
    for r in results:
        add_usage(usage, r.get("usage") or {})
        if r.get("node"):
            nodes[r["node"]] = nodes.get(r["node"], 0) + 1
    return EvalResult(round(total / len(examples), 6), len(examples), failed, round(time.time() - started, 3), usage,
                      nodes)


@contextlib.contextmanager
def batches_of(program: dspy.Module, size: int) -> Iterator[None]:
    """While open, each finetuned LM of `program` puts up to `size` prompts in one `generate` (never fewer than
    its own batch size); then it takes its own size back. Actors get the program with the wider batches."""
    engines = {id(e): e for e in (finetuned_engine(p.lm) for p in program.predictors()) if e is not None}
    own = {key: engine.batch_size for key, engine in engines.items()}
    for key, engine in engines.items():
        if size > own[key]:
            engine.set_batch_size(size)
    try:
        yield
    finally:
        for key, engine in engines.items():
            if engine.batch_size != own[key]:
                engine.set_batch_size(own[key])


def teacher_score(val: BootstrapResult | None, metric: Callable | None) -> float | None:
    """The teacher's metric on the valset, read from its valset traces (failures count 0)."""
    if val is None or metric is None or not val.summary.examples:
        return None
    per_example: dict[int, float] = {}
    for call in val.calls:
        if call.teacher == 0:
            per_example[call.example_index] = _score(call.score)
    return round(sum(per_example.values()) / val.summary.examples, 6)

