"""Stage 3: kept teacher calls become chat records, one JSONL file per model key.

Each record is written in the prompt form the *student* will see at inference: the
student's predictor signature and demos (none with `exclude_demos`), formatted by the
adapter in use (see `bootfinetune.stages.adapters`: ChatAdapter, JSONAdapter, XMLAdapter...).
An answer the adapter does not parse back to the teacher's outputs is dropped and counted.
Per-predictor and shared models differ only in the key: "all" in multitask mode,
the predictor's name otherwise. A key's file is named by its safe folder name (`RunDir.folder`):
`data/answer.predict.jsonl`, but `data/chains-a-b-63b4399e.jsonl` for `chains['a b']`.

A line of `data/{folder}.jsonl`:

    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}],
     "predictor": "generate_answer.predict", "example_index": 3}
"""

from __future__ import annotations

import json
import logging
from typing import Any

import dspy

from bootfinetune.stages.adapters import answer_problem, finetune_messages, resolve_adapter
from bootfinetune.stages.checks import ProgramPlan
from bootfinetune.run.records import CallRecord
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import DataSummary

logger = logging.getLogger(__name__)


def format_call(call: CallRecord, predictor: dspy.Predict, adapter: Any, exclude_demos: bool) -> list[dict]:
    """The chat messages that teach `predictor` to answer `call.inputs` with `call.outputs`."""
    demos = [] if exclude_demos else list(predictor.demos)
    return finetune_messages(adapter, predictor.signature, demos, call.inputs, call.outputs)


def data_path(run: RunDir, key: str, split: str) -> Any:
    """data/{folder}.jsonl (or data/{split}/{folder}.jsonl): the key's folder name as the run records it."""
    return run.data_file(key, split)


def build_datasets(run: RunDir, calls: list[CallRecord], plan: ProgramPlan, student: dspy.Module, *,
                   adapter: Any = None, exclude_demos: bool = False, drop_duplicates: bool = False,
                   split: str = "train") -> dict[str, DataSummary]:
    """Writes `data/{key}.jsonl` (or `data/{split}/{key}.jsonl`) for every model key of the plan.

    Records are ordered by example, then by their order in the trace, so the files do not
    depend on how many actors bootstrapped them. With `drop_duplicates`, identical records
    are kept once (counted either way in `duplicates`).
    """
    adapter = resolve_adapter(adapter)
    predictors = dict(student.named_predictors())
    summaries = {key: DataSummary(key=key, predictors=plan.predictors_of(key)) for key in plan.keys()}
    rows: dict[str, list[dict]] = {key: [] for key in plan.keys()}
    seen: dict[str, set[str]] = {key: set() for key in plan.keys()}
    for call in sorted(calls, key=lambda c: (c.example_index, c.teacher, c.call_index)):
        if not call.kept or call.predictor not in plan.key_of:
            continue
        key = plan.key_of[call.predictor]
        summary = summaries[key]
        try:
            messages = format_call(call, predictors[call.predictor], adapter, exclude_demos)
        except (KeyError, ValueError, TypeError) as exc:
            logger.warning("%s call of example %d not formattable: %s", call.predictor, call.example_index, exc)
            summary.unformattable += 1
            continue
        problem = answer_problem(adapter, predictors[call.predictor].signature, messages[-1]["content"], call.outputs)
        if problem:
            logger.warning("%s call of example %d dropped: %s", call.predictor, call.example_index, problem)
            summary.unparseable += 1
            continue
        fingerprint = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if fingerprint in seen[key]:
            summary.duplicates += 1
            if drop_duplicates:
                summary.duplicates_dropped += 1
                continue
        seen[key].add(fingerprint)
        rows[key].append({"messages": messages, "predictor": call.predictor, "example_index": call.example_index})
        summary.per_predictor[call.predictor] = summary.per_predictor.get(call.predictor, 0) + 1
    for key, summary in summaries.items():
        summary.records = run.write_data(key, rows[key], split)
        summary.path = str(data_path(run, key, split))
    return summaries
