"""One model to finetune (`FinetuneJob`): its key, target and data files, the data read and checked, and
the key once staged for its workers (`StagedJob`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootfinetune.common.chat import ends_with_answer
from bootfinetune.config import TrainConfig
from bootfinetune.errors import FinetuneError
from bootfinetune.run.jsonio import read_jsonl
from bootfinetune.stages.train_runs import Trainee


@dataclass(frozen=True)
class FinetuneJob:
    """One model to finetune: a model key, its base model and its data."""

    key: str
    """Model key: "all" in multitask mode, else the predictor's name."""
    target: str
    """Base model: Hugging Face id or local directory."""
    predictors: tuple[str, ...]
    """Names of the predictors this model serves."""
    train_file: Path
    """data/{key}.jsonl: {"messages": [...], "predictor": name, "example_index": int} per line."""
    eval_file: Path | None = None
    """JSONL of the same shape from the valset; None holds out `eval_fraction` of train_file."""
    added_tokens: tuple[str, ...] | None = None
    """Tokens added to the target's tokenizer so every answer survives it (`token_plan.plan_tokens`);
    None: not decided yet, `finetune_models` checks the data itself."""


@dataclass
class StagedJob:
    """A key ready to train: what its workers get (`trainee`) and what its export needs."""

    job: FinetuneJob
    trainee: Trainee
    records: tuple[int, int, str]
    """Train records, eval records, and where eval came from."""
    kind: str
    tokenizer: Any
    """The target's tokenizer with the added tokens (exported beside the model)."""
    base_vocab: int
    job_fp: str


def load_job_data(job: FinetuneJob, config: TrainConfig) -> tuple[list[dict], list[dict], str]:
    """A job's train and eval records, checked, and where eval came from ("valset", "held_out" or "none")."""
    records = _checked_records(job.key, job.train_file)
    if job.eval_file is not None:
        return records, _checked_records(job.key, job.eval_file), "valset"
    train, held = split_records(records, config.eval_fraction, config.seed)
    return train, held, ("held_out" if held else "none")


def split_records(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Holds out `fraction` of the records (at least one when fraction > 0 and there are 2+), seeded.

    Example:
        >>> train, held = split_records([{"i": i} for i in range(10)], 0.2, seed=0)
        >>> len(train), len(held), sorted(r["i"] for r in train + held) == list(range(10))
        (8, 2, True)
    """
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n = min(len(records) - 1, max(1, round(fraction * len(records))))
    held = set(order[:n])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def _checked_records(key: str, path: Path) -> list[dict]:
    if not Path(path).exists():
        raise FinetuneError(f"model {key!r}: data file {path} does not exist; run the datasets stage first.")
    records = read_jsonl(path)
    if not records:
        raise FinetuneError(f"model {key!r}: data file {path} has no records; bootstrapping kept no traces.")
    for i, r in enumerate(records):
        messages = r.get("messages")
        if not (isinstance(messages, list) and ends_with_answer(messages)):
            raise FinetuneError(f"model {key!r}: {path} line {i + 1} needs 'messages' ending with an assistant turn.")
    return records


def worker_rows(records: list[dict]) -> list[dict]:
    """The records as the workers read them: messages with their position, so every rank sorts alike."""
    return [{"messages": r["messages"], "row": i} for i, r in enumerate(records)]
