"""One worker group, several models: the per-worker function of one Ray Train run that trains models in turn.

`train_models({"models": [loop_config, ...]})` runs `train_loop.train_loop` on each model's `LoopConfig`,
one after another, in the order given; every rank does the same, so their collectives stay paired. A
model whose checkpoint folder already holds its last epoch returns at once (the loop reads its state
and stops), so a restarted run goes straight to the model it stopped in and resumes that one from its
newest checkpoint. The process group, the imports and the worker processes are paid once for all of them:
that is why the finetune stage gives a run every model whose workers ask for the same resources.

A model that raises stops the run (a collective would hang otherwise); the driver then knows, from the
checkpoint folders, which models finished and which one stopped it (`stages.finetune`). Plain Python, like
`train_loop`: it runs without Ray too.
"""

from __future__ import annotations

import gc
from typing import Any

from bootfinetune.training.train_loop import train_loop


def train_models(config: dict[str, Any]) -> list[dict[str, Any] | None]:
    """Trains each of `config["models"]` (`LoopConfig` fields as dicts) in turn.

    Returns:
        Each model's final `LoopState` as a dict on rank 0 (None elsewhere), in order.
    """
    states = []
    for loop_config in config["models"]:
        states.append(train_loop(loop_config))
        gc.collect()  # the finished model's engine and optimizer go before the next model loads
    return states
