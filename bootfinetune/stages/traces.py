"""Teacher traces: what identifies them (the store that keeps them across runs is `run/trace_store.py`).

Traces are the expensive part of a compile (a hosted teacher costs money and hours), so
they are keyed by what produces them, not by how the student is trained:

- the structure of the teacher programs (predictors, signatures, demos, LMs) and the student's
  predictors and signatures (its LMs and demos only shape the training data),
- `teacher_settings`, with LMs by model and options and other objects by class and settings,
- the driver's `dspy.configure` settings the teacher runs under (lm, rm, the other carried settings,
  and the compile's adapter: the teacher writes its prompts with it),
- the metric and its threshold.

Training options, the target, LoRA, ZeRO and resources are left out: changing them reuses every trace.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
from typing import Any, Callable

import dspy

from bootfinetune.stages.checks import callable_identity, lm_identity, program_identity
from bootfinetune.run.records import example_to_json

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Settings that observe the teacher's calls, or set how DSPy runs them (threads, history, error
# limits), without changing what the teacher answers: left out of the identity, so adding a logging
# callback or more threads does not re-run the teacher.
_OBSERVERS = {"callbacks", "track_usage", "usage_tracker", "trace", "num_threads", "async_max_workers",
              "max_errors", "disable_history", "max_history_size", "max_trace_size", "provide_traceback",
              "warn_on_type_mismatch"}


def stable_identity(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a value that is the same in every process (never a memory address).

    LMs are described by `lm_identity`, programs by `program_identity`, functions and classes
    by name and source hash, other objects by their class and their public attributes.

    >>> stable_identity({"temperature": 0.7, "stop": ("\\n",)})
    {'temperature': 0.7, 'stop': ['\\n']}
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return _ADDRESS.sub("", value)
    if isinstance(value, dspy.BaseLM):
        return lm_identity(value)
    if isinstance(value, dspy.Module):
        return program_identity(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [stable_identity(v, depth + 1) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, dict):
        return {str(k): stable_identity(v, depth + 1) for k, v in value.items()}
    if isinstance(value, functools.partial):  # a metric with its threshold bound in: every part counts
        return {"partial": stable_identity(value.func, depth + 1), "args": stable_identity(value.args, depth + 1),
                "keywords": stable_identity(value.keywords, depth + 1)}
    if inspect.isroutine(value) or inspect.isclass(value):
        return callable_identity(value)
    described: dict[str, Any] = {"class": callable_identity(type(value))}
    if depth < 4 and hasattr(value, "__dict__"):
        described["attrs"] = {k: stable_identity(v, depth + 1) for k, v in sorted(vars(value).items())
                              if not k.startswith("_") and k not in _OBSERVERS}
    return described


def trace_identity(*, student: dspy.Module, teachers: list[dspy.Module], teacher_settings: dict[str, Any],
                   settings: dict[str, Any], metric: Callable | None, metric_threshold: float | None) -> dict[str, Any]:
    """What produces a compile's teacher traces, part by part (see the module docstring).

    Args:
        student: The student; its predictor names decide which trace steps are recorded.
        teachers: The teacher programs.
        teacher_settings: Applied while the teachers run.
        settings: The driver's `dspy.configure` settings that reach the actors (lm, rm, adapter).
        metric: The metric, or None.
        metric_threshold: The threshold that keeps float scores.

    Returns:
        {part: description}; `trace_id` hashes it.
    """
    # The student's LMs and demos shape training data, not traces (its LM is where a 3.x-style program
    # names its target); what the traces need from it is which predictors exist and their signatures.
    shape = program_identity(student)
    shape["predictors"] = [{k: v for k, v in p.items() if k not in ("lm", "demos")} for p in shape["predictors"]]
    return {
        "student": shape,
        "teachers": [program_identity(t) for t in teachers],
        "teacher_settings": {k: stable_identity(v) for k, v in sorted(teacher_settings.items())
                             if k not in _OBSERVERS},
        "settings": {k: stable_identity(v) for k, v in sorted(settings.items()) if k not in _OBSERVERS},
        "metric": stable_identity(metric),
        "metric_threshold": metric_threshold,
    }


def example_key(example: dspy.Example) -> str:
    """What identifies one example in a store: a hash of its JSON (fields and which are inputs)."""
    return hashlib.sha256(example_to_json(example).encode()).hexdigest()[:16]


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the trace identity's parts that differ, from their per-part fingerprints.

    >>> identity_changes({"metric": "a", "teachers": "b"}, {"metric": "c", "teachers": "b"})
    ['metric']
    """
    return [part for part in sorted(set(old) | set(new)) if old.get(part) != new.get(part)]


def example_changes(old: list[str], new: list[str]) -> str | None:
    """"4 new, 1 removed examples" between two lists of example keys, or None when the same."""
    if old == new:
        return None
    added, removed = len(set(new) - set(old)), len(set(old) - set(new))
    if not added and not removed:
        return "the same examples in another order"
    return f"{added} new, {removed} removed example(s)"


def restamp(result: dict[str, Any], example_index: int, split: str) -> dict[str, Any]:
    """A stored result as the record of example `example_index` of `split` in this run."""
    out = dict(result)
    if "calls" in out:
        out["calls"] = [{**c, "example_index": example_index, "split": split} for c in out["calls"]]
    if "failure" in out:
        out["failure"] = {**out["failure"], "example_index": example_index, "split": split}
    return out
