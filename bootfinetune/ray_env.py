"""Joining or starting the Ray cluster that runs the stages."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

WORKER_ENV = {
    # DSPy (through LiteLLM) otherwise fetches a model price list from the network on first use.
    "LITELLM_LOCAL_MODEL_COST_MAP": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Environment every Ray worker gets; values are never secrets."""


def ensure_ray(address: str | None = None) -> None:
    """Connects to Ray once: the given address, else $RAY_ADDRESS or a running cluster, else a new local one."""
    import ray

    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    kwargs = {"runtime_env": {"env_vars": dict(WORKER_ENV)}, "log_to_driver": True}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False
    ray.init(address=address, **kwargs)
    logger.info("Ray: %s", ray.cluster_resources())
