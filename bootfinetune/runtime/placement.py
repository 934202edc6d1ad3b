"""Where the work that runs a model goes: Ray processes holding one training worker's resources.

On every documented cluster the driver runs on a head without accelerators. So what runs a model
(training, scoring the valset before and after, exporting a checkpoint) asks Ray for what one
training worker asked for: its CPUs, its GPUs when `use_gpu` is set, and `resources_per_worker`
(a custom resource, an accelerator type). When the training asked for CPUs alone, the driver has
what a model needs, and small jobs may run there instead.
"""

from __future__ import annotations

from typing import Any

from bootfinetune.config import TrainConfig


def worker_resources(config: TrainConfig) -> dict[str, float]:
    """Ray resources one training worker asks for (Ray Train's `resources_per_worker`, CPUs and GPUs included).

    >>> worker_resources(TrainConfig(use_gpu=True, cpus_per_worker=4, resources_per_worker={"A100": 1}))
    {'CPU': 4, 'GPU': 1.0, 'A100': 1}
    """
    return {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if config.use_gpu else {}),
            **(config.resources_per_worker or {})}


def needs_accelerator(config: TrainConfig) -> bool:
    """Whether a training worker asked for more than CPUs: then no model runs in the driver."""
    return any(name != "CPU" for name in worker_resources(config))


def ray_options(resources: dict[str, float]) -> dict[str, Any]:
    """`resources` as the keyword arguments of `ray.remote(...)` / `map_batches(...)`.

    >>> ray_options({"CPU": 2, "GPU": 1, "A100": 1})
    {'num_cpus': 2, 'num_gpus': 1, 'resources': {'A100': 1}}
    """
    options: dict[str, Any] = {"num_cpus": resources.get("CPU", 0)}
    if resources.get("GPU"):
        options["num_gpus"] = resources["GPU"]
    custom = {name: amount for name, amount in resources.items() if name not in ("CPU", "GPU")}
    if custom:
        options["resources"] = custom
    return options
