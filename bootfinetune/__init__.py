"""bootfinetune: DSPy's BootstrapFinetune as a distributed compiler on Ray."""

from bootfinetune.compiler import BootstrapFinetune, Prepared
from bootfinetune.config import BootstrapConfig, Config, RunOptions, TrainConfig
from bootfinetune.errors import (BootFinetuneError, BootstrapError, ConfigError, FinetuneError, ProgramError,
                                 TrainDataError)
from bootfinetune.lm import FinetunedEngine, FinetunedLM, finetuned_engine
from bootfinetune.provider import RayFinetuneProvider
from bootfinetune.rebind import load
from bootfinetune.serve import ModelServer, serve_model, stop_model

__all__ = ["BootstrapFinetune", "Prepared", "FinetunedLM", "FinetunedEngine", "finetuned_engine", "load", "Config", "BootstrapConfig", "TrainConfig", "RunOptions",
           "RayFinetuneProvider", "ModelServer", "serve_model", "stop_model",
           "BootFinetuneError", "BootstrapError", "ConfigError", "FinetuneError", "ProgramError", "TrainDataError"]
__version__ = "0.1.0"
