"""Errors bootfinetune raises. Each message names what is wrong and how to fix it."""

from __future__ import annotations


class BootFinetuneError(Exception):
    """Base class of every error bootfinetune raises on purpose."""


class ProblemsError(BootFinetuneError, ValueError):
    """Every problem found at once, one line each in `problems`; subclasses name what the problems are about.

    >>> str(ConfigError(["epochs=0: must be at least 1.", "lr=-1: must be positive."]))
    '2 configuration problem(s):\\n  - epochs=0: must be at least 1.\\n  - lr=-1: must be positive.'
    """

    about = "input"
    """What the problems concern, as the message's first line says it."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} {self.about} problem(s):\n{lines}")


class ConfigError(ProblemsError):
    """One or more options are wrong. `problems` lists every one of them."""

    about = "configuration"


class ProgramError(ProblemsError):
    """The student, teacher or trainset cannot be compiled as given. `problems` lists every one."""

    about = "program"


class TrainDataError(ProblemsError):
    """The training data handed to a provider's `finetune` cannot be trained on. `problems` lists what is wrong."""

    about = "training data"


class BootstrapError(BootFinetuneError, RuntimeError):
    """Bootstrapping stopped: too many examples failed (the first few are in the message)."""


class FinetuneError(BootFinetuneError, RuntimeError):
    """A finetuning job failed; the message names its model key and the cause."""


class RunBusyError(BootFinetuneError, RuntimeError):
    """Another process writes the same run directory; the message names it (host, pid, start time, command)."""
