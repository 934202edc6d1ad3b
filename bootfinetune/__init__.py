"""bootfinetune: DSPy's BootstrapFinetune as a distributed compiler on Ray."""

from bootfinetune.compiler import BootstrapFinetune, Prepared
from bootfinetune.config import BootstrapConfig, Config, RunOptions, TrainConfig
from bootfinetune.errors import BootFinetuneError, BootstrapError, ConfigError, FinetuneError, ProgramError
from bootfinetune.lm import FinetunedLM
from bootfinetune.rebind import load

__all__ = ["BootstrapFinetune", "Prepared", "FinetunedLM", "load", "Config", "BootstrapConfig", "TrainConfig", "RunOptions",
           "BootFinetuneError", "BootstrapError", "ConfigError", "FinetuneError", "ProgramError"]
__version__ = "0.1.0"
