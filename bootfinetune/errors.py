"""Errors bootfinetune raises. Each message names what is wrong and how to fix it."""

from __future__ import annotations


class BootFinetuneError(Exception):
    """Base class of every error bootfinetune raises on purpose."""


class ConfigError(BootFinetuneError, ValueError):
    """One or more options are wrong. `problems` lists every one of them."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")


class ProgramError(BootFinetuneError, ValueError):
    """The student, teacher or trainset cannot be compiled as given. `problems` lists every one."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} program problem(s):\n{lines}")


class BootstrapError(BootFinetuneError, RuntimeError):
    """Bootstrapping stopped: too many examples failed (the first few are in the message)."""


class FinetuneError(BootFinetuneError, RuntimeError):
    """A finetuning job failed; the message names its model key and the cause."""
