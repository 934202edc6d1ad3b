"""The Ray Train runs of the finetune stage: which models share a worker group, each run, and restarts.

Starting a Ray Train run costs seconds whatever it trains (its controller and worker actors, each a new
process importing Ray Train and torch, then the process group), and so does each worker's set-up. So the
models of a compile do not get a run each: they are dealt into *lanes*, as many as the cluster has room for
side by side (each lane's workers ask `lane_resources`), and each lane is one `TorchTrainer` run whose
workers train its models one after another (`training.model_queue.train_models`). One lane trains every
model on a cluster that fits one worker group; four fit four models side by side.

Each model keeps its own checkpoint folder (`checkpoints/{folder}`, written by the loop), so what a run did
is read from there, whatever happened to the run: a model whose last epoch is there finished. A run that
fails (a worker died, a model raised) stopped in its first unfinished model; that model is charged one
failure, and the lane runs again from it, each model resuming from its newest checkpoint. A model charged
more than `max_failures` failures is given up, with the error, and the lane goes on with the next one: one
model's crash never loses another's finished training. The restarts are the driver's, not Ray Train's
(`FailureConfig(max_failures=0)`): Ray Train's restart budget is the run's, which several models share.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootfinetune.config import TrainConfig
from bootfinetune.runtime.placement import worker_resources
from bootfinetune.training.checkpoints import latest_state
from bootfinetune.training.model_queue import train_models

log = logging.getLogger(__name__)


@dataclass
class Trainee:
    """One model for a lane: its key, the loop config its workers get and the folder its checkpoints go to."""

    key: str
    loop_config: dict[str, Any]
    """`LoopConfig` fields; its `checkpoint_dir` is `checkpoint_dir`."""
    checkpoint_dir: str
    """The model's checkpoint folder (a path, or a cloud URI)."""


@dataclass
class Outcome:
    """How a model's training ended: its final loop state, or the error it was given up with."""

    key: str
    state: dict[str, Any] | None = None
    """The loop state of its last epoch (None when it failed)."""
    error: BaseException | None = None
    begin: float = 0.0
    """Unix time its share of the run began: the run's start for the run's first model, else the previous
    model's end."""
    end: float = 0.0
    """Unix time its share ended: when the next model's loop started, or the run returned."""


def lane_resources(config: TrainConfig) -> dict[str, float]:
    """Ray resources one lane's workers hold together."""
    return {name: amount * config.num_workers for name, amount in worker_resources(config).items()}


def fits(need: dict[str, float], budget: dict[str, float]) -> bool:
    """Whether `need` fits in `budget` (resources not in the budget count as 0)."""
    return all(budget.get(k, 0.0) >= v - 1e-9 for k, v in need.items())


def lanes(keys: list[str], need: dict[str, float], budget: dict[str, float]) -> list[list[str]]:
    """The keys dealt into as many lanes as fit in `budget` side by side (at least one), in their order.

    >>> lanes(["a", "b", "c"], {"CPU": 2.0}, {"CPU": 2.0}), lanes(["a", "b", "c"], {"CPU": 2.0}, {"CPU": 4.5})
    ([['a', 'b', 'c']], [['a', 'c'], ['b']])
    """
    room = min((budget.get(k, 0.0) / v for k, v in need.items() if v > 0), default=float(len(keys)))
    n = max(1, min(len(keys), math.floor(room + 1e-9)))
    return [keys[i::n] for i in range(n)]


def train_in_lanes(trainees: list[Trainee], config: TrainConfig, storage_path: str, storage_fs: Any,
                   budget: dict[str, float]) -> dict[str, Outcome]:
    """Trains every trainee, in lanes side by side as `budget` allows; returns each one's outcome."""
    by_key = {t.key: t for t in trainees}
    dealt = lanes(list(by_key), lane_resources(config), budget)
    outcomes: dict[str, Outcome] = {}
    with ThreadPoolExecutor(max_workers=len(dealt), thread_name_prefix="finetune-lane") as pool:
        for done in pool.map(lambda keys: _run_lane([by_key[k] for k in keys], config, storage_path, storage_fs),
                             dealt):
            outcomes.update(done)
    return {t.key: outcomes[t.key] for t in trainees}


def _run_lane(queue: list[Trainee], config: TrainConfig, storage_path: str, storage_fs: Any) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    failures: Counter[str] = Counter()
    queue = list(queue)
    while queue:
        started = time.time()
        error = _fit(queue, config, storage_path, storage_fs)
        ended = time.time()
        finished = []
        for trainee in queue:
            _, state = latest_state(trainee.checkpoint_dir)
            if state is None or state["epochs_done"] < config.epochs:
                break
            finished.append(Outcome(trainee.key, state))
        _windows(finished, queue, started, ended)
        outcomes.update({o.key: o for o in finished})
        queue = queue[len(finished):]
        if not queue:
            break
        stopped = queue[0]
        failures[stopped.key] += 1
        error = error or RuntimeError("the Ray Train run ended before this model's last epoch")
        if failures[stopped.key] > config.max_failures:
            outcomes[stopped.key] = Outcome(stopped.key, error=error)
            queue.pop(0)
            if queue:
                log.warning("model %r failed (%s: %s); training the next model(s) of its lane: %s", stopped.key,
                            type(error).__name__, str(error).splitlines()[0][:200], ", ".join(t.key for t in queue))
        else:
            log.warning("model %r: its training stopped (%s); restarting from its last checkpoint (restart %d of "
                        "max_failures=%d)", stopped.key, type(error).__name__, failures[stopped.key], config.max_failures)
    return outcomes


def _windows(finished: list[Outcome], queue: list[Trainee], started: float, ended: float) -> None:
    """Each finished model's share of one run (`Outcome.begin`, `Outcome.end`), in queue order."""
    begin = started
    for i, outcome in enumerate(finished):
        end = ended
        if i + 1 < len(queue):  # the next model's loop start, when it started in this run
            _, state = latest_state(queue[i + 1].checkpoint_dir)
            loop_started = ((state or {}).get("timings") or {}).get("loop_started_at", 0.0)
            if begin <= loop_started <= ended:
                end = loop_started
        outcome.begin, outcome.end = begin, end
        begin = end


def _fit(queue: list[Trainee], config: TrainConfig, storage_path: str, storage_fs: Any) -> BaseException | None:
    """One Ray Train run over the queue's models in order; the error it ended with, or None."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's own run folder: no checkpoints there (each model's are in its own folder), and a new name
    # per run, so that it never restores an earlier run's state.
    name = f".ray-{Path(queue[0].checkpoint_dir.split('?')[0]).name}-{time.time_ns()}"
    trainer = TorchTrainer(
        train_models,
        train_loop_config={"models": [t.loop_config for t in queue]},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=worker_resources(config)),
        run_config=RunConfig(storage_path=storage_path, storage_filesystem=storage_fs, name=name,
                             failure_config=FailureConfig(max_failures=0)),
    )
    try:
        trainer.fit()
        return None
    except Exception as e:  # the driver decides what a failure means (module docstring)
        return e
    finally:
        if storage_fs is None:
            shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                storage_fs.delete_dir(f"{storage_path}/{name}")
