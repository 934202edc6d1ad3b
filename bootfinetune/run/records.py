"""The plain records that cross process boundaries and land in the run directory.

No live DSPy object crosses from a Ray actor to the driver: examples travel as JSON
strings, and each teacher call comes back as a `CallRecord` of JSON values. The run
directory's own files (config.json, summaries, manifests, report.json) are `bootfinetune.run.runfiles`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import dspy


@dataclass
class CallRecord:
    """One predictor call in a teacher trace."""

    example_index: int
    """Position of the example in the trainset."""
    predictor: str
    """The predictor's name in `named_predictors()`, e.g. "generate_answer.predict"."""
    call_index: int
    """Order of this call within the example's trace (a predictor called twice has two records)."""
    inputs: dict[str, Any]
    """The predictor's input fields, as JSON values."""
    outputs: dict[str, Any]
    """The predictor's output fields, as JSON values."""
    score: float | None
    """The metric's score for the whole example (None without a metric)."""
    kept: bool
    """Whether the example's trace passed the metric (only kept calls become training data)."""
    teacher: int = 0
    """Index of the teacher that produced it, when several teachers are pooled."""
    split: str = "train"
    """"train", or "val" for calls made on the valset."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FailureRecord:
    """An example whose teacher run (or metric) raised."""

    example_index: int
    """Position of the example in its set."""
    error_type: str
    """The exception's class name."""
    message: str
    """The exception's message, with secrets redacted."""
    teacher: int = 0
    """Index of the teacher that failed."""
    split: str = "train"
    """"train" or "val"."""
    stage: str = "program"
    """Where it failed: "program" (the teacher run) or "metric"."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_jsonable(value: Any) -> Any:
    """Turns field values into JSON values: pydantic models dumped, tuples to lists, NaN to None."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "model_dump"):
        return to_jsonable(value.model_dump(mode="json"))
    if isinstance(value, dspy.Example):
        return to_jsonable(value.toDict())
    return str(value)


def non_json_fields(example: dspy.Example) -> list[str]:
    """Names of the example's fields whose values do not survive a JSON round trip."""
    bad = []
    for key, value in example.items():
        try:
            if json.loads(json.dumps(value)) != value:
                bad.append(key)
        except (TypeError, ValueError):
            bad.append(key)
    return bad


def example_to_json(example: dspy.Example) -> str:
    """An example as a JSON string: its fields and which of them are inputs."""
    return json.dumps({"fields": dict(example.items()), "inputs": sorted(example.inputs().keys())},
                      sort_keys=True, ensure_ascii=False)


def example_from_json(text: str) -> dspy.Example:
    data = json.loads(text)
    return dspy.Example(**data["fields"]).with_inputs(*data["inputs"])
