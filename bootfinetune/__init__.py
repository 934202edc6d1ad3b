"""bootfinetune: DSPy's BootstrapFinetune as a distributed compiler on Ray.

The public names below load on first use, so a process that needs one part (a Ray Train worker
imports `bootfinetune.training` only) does not pay for DSPy and the rest:

    from bootfinetune import BootstrapFinetune      # the optimizer (bootfinetune.compiler)
    bootfinetune.load("runs/TwoStep-1a2b3c")        # a compiled program back from its run directory

Where each part lives: `compiler.py` and `pipeline.py` order the stages, `stages/` holds one module per stage,
`training/` the engine inside each Ray Train worker, `serving/` the finetuned models answering
calls, `run/` the run directory, `entrypoints/` the command, the Ray jobs and DSPy's provider API.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from bootfinetune.runtime.user_code import keep_sources

_EXPORTS = {
    "bootfinetune.compiler": ["BootstrapFinetune", "Prepared"],
    "bootfinetune.config": ["BootstrapConfig", "Config", "RunOptions", "TrainConfig"],
    "bootfinetune.errors": ["BootFinetuneError", "BootstrapError", "ConfigError", "FinetuneError", "ProgramError",
                            "RunBusyError", "TrainDataError"],
    "bootfinetune.serving.lm": ["FinetunedEngine", "FinetunedLM", "finetuned_engine"],
    "bootfinetune.entrypoints.provider": ["RayFinetuneProvider"],
    "bootfinetune.stages.rebind": ["load"],
    "bootfinetune.serving.serve": ["ModelServer", "serve_model", "stop_model"],
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["BootFinetuneError", "BootstrapConfig", "BootstrapError", "BootstrapFinetune", "Config", "ConfigError",
           "FinetuneError", "FinetunedEngine", "FinetunedLM", "ModelServer", "Prepared", "ProgramError",
           "RayFinetuneProvider", "RunBusyError", "RunOptions", "TrainConfig", "TrainDataError", "finetuned_engine",
           "load", "serve_model", "stop_model"]
assert sorted(__all__) == sorted(_HOME)
__version__ = "0.1.0"

keep_sources()  # the user's modules' files as imported, for Ray workers even if the files move later

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from bootfinetune.compiler import BootstrapFinetune, Prepared  # noqa: F401
    from bootfinetune.config import BootstrapConfig, Config, RunOptions, TrainConfig  # noqa: F401
    from bootfinetune.entrypoints.provider import RayFinetuneProvider  # noqa: F401
    from bootfinetune.errors import (BootFinetuneError, BootstrapError, ConfigError, FinetuneError,  # noqa: F401
                                     ProgramError, RunBusyError, TrainDataError)
    from bootfinetune.serving.lm import FinetunedEngine, FinetunedLM, finetuned_engine  # noqa: F401
    from bootfinetune.serving.serve import ModelServer, serve_model, stop_model  # noqa: F401
    from bootfinetune.stages.rebind import load  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'bootfinetune' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
