"""Joining or starting the Ray cluster that runs the stages: the one way the package does it.

The rule, in order:

1. An explicit address (an argument, else `$RAY_ADDRESS`) wins: Ray is joined there.
2. Otherwise a cluster already running on this machine (started with `ray start`, which writes its
   address to `ray_current_cluster` in Ray's temp folder) is joined, and a log line says so.
3. A `ray_current_cluster` pointing at a cluster that is gone (a `ray start` that died without
   `ray stop`) is ignored with a warning: left to Ray, `ray.init()` hangs trying to reach it and
   `ray.init(num_cpus=...)` raises "When connecting to an existing cluster, num_cpus and num_gpus
   must not be provided".
4. Otherwise a new local cluster starts; only then are resources such as `num_cpus` passed.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

logger = logging.getLogger(__name__)

WORKER_ENV = {
    # DSPy (through LiteLLM) otherwise fetches a model price list from the network on first use.
    "LITELLM_LOCAL_MODEL_COST_MAP": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Environment every Ray worker gets; values are never secrets."""

DRIVER_ENV = {
    # Ray Train's controller polls its workers this often (Ray's default: 2 s); a finished training function
    # is seen only at the next poll, so every fit waited up to 2 s more than it ran. A poll is one small
    # actor call per worker. Ray Train carries this variable from the driver to its controller; a value the
    # user set is kept.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
"""Environment of this (driver) process, each kept when the user set it."""


def set_driver_env() -> None:
    """`WORKER_ENV` and `DRIVER_ENV` in this process's environment, where the user has not set them."""
    for name, value in {**WORKER_ENV, **DRIVER_ENV}.items():
        os.environ.setdefault(name, value)


def local_cluster_pointer() -> tuple[str, str] | None:
    """The file a `ray start` on this machine left, and the address in it, or None.

    It is the file `ray.init()` reads to find a running cluster: `ray_current_cluster` in Ray's
    temp folder (`$RAY_TMPDIR/ray`, else `$TMPDIR/ray` on Linux, else `/tmp/ray`).
    """
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path, encoding="utf-8") as f:
            address = f.read().strip()
    except OSError:  # no file: no cluster was started with `ray start` here
        return None
    return (path, address) if address else None


def is_reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether something listens at a Ray GCS address `host:port` (a cheap check before `ray.init` waits on it)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
               log_to_driver: bool = True, env_vars: dict[str, str] | None = None) -> str:
    """Connects to Ray once, by the rule in this module's docstring, and says how.

    Args:
        address: A Ray address (`host:port`, `ray://...`, `auto`, or `local` for a new local cluster);
            None reads `$RAY_ADDRESS`, then looks for a cluster running on this machine.
        num_cpus, num_gpus: Resources of a new local cluster; ignored (with a log line) when joining one.
        log_to_driver: Whether workers' output is printed by this process.
        env_vars: More environment for this process's Ray workers, on top of `WORKER_ENV`
            (tests and benchmarks pin `OMP_NUM_THREADS`, for example).

    Returns:
        One line for the user: which cluster this process joined or started (or was already on).
    """
    import ray

    set_driver_env()
    if ray.is_initialized():
        return f"Ray: already connected: {_describe(ray.cluster_resources())}"
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": {**WORKER_ENV, **(env_vars or {})}},
                              "log_to_driver": log_to_driver}
    resources = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v is not None}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and address != "local":
        return _join(ray, address, f"{address} (ray_address or $RAY_ADDRESS)", resources, kwargs)
    pointer = local_cluster_pointer() if address is None else None
    if pointer is not None:
        path, found = pointer
        if is_reachable(found):
            # address=None, not the address read: only then does Ray send this machine's
            # auth token (~/.ray/auth_token) to a cluster that `ray start` started with token auth.
            return _join(ray, None, f"the cluster already running on this machine at {found} (found in {path}; "
                         "ray_address='local' starts a new one instead)", resources, kwargs)
        logger.warning("Ignoring %s: it points to a Ray cluster at %s that is not running (a `ray start` that "
                       "ended without `ray stop`). Starting a new local cluster; delete that file to silence this.",
                       path, found)
    ray.init(address="local", include_dashboard=False, **resources, **kwargs)
    return _say(f"Ray: started a new local cluster: {_describe(ray.cluster_resources())}")


def _join(ray: Any, address: str | None, where: str, resources: dict[str, int], kwargs: dict[str, Any]) -> str:
    if resources:
        logger.info("Ray: joining an existing cluster, so %s are the cluster's own, not set here",
                    " and ".join(resources))
    ray.init(address=address, **kwargs)
    return _say(f"Ray: joined {where}: {_describe(ray.cluster_resources())}")


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{int(resources.get(k, 0))} {k}s" for k in ("CPU", "GPU") if resources.get(k))


def _say(line: str) -> str:
    logger.info("%s", line)
    return line
