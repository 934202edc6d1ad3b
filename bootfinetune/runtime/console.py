"""What a compile prints: live bars on a terminal; elsewhere, lines a person can read.

Output that is not a terminal (a Ray job's log, CI, a file) gets one line per stage start and
end (the compiler's `stage k/6` lines) and progress lines at a bounded rate: one each time a
stage crosses a tenth of its work, or, between tenths, `LINE_EVERY_S` after the last line, spacing out
to a quarter of the stage's time so far (`ProgressLine`): a slow stage of an hour gets ~30 lines, not 120.
Nothing is redrawn: Ray Data's bars and Hugging Face's weight loading bars are off (`bars_off`).
A terminal keeps live bars (Ray Data's, and the training bars of `bootfinetune.training.progress`).

Ray's own chatter is kept out unless `verbose=True` (`--verbose`), by `set_console_output` on the driver:

- Ray Data's per-dataset INFO lines ("Starting execution of Dataset ...", "Execution plan",
  "... execution finished in ...") and its logged progress stay in its log file
  (`/tmp/ray/session_*/logs/ray-data`), not the console; its warnings and errors still show;
- DSPy's warnings that repeat once per call ("LM response was truncated") show once, and the count
  of the ones held back is logged when the compile ends (`RepeatFilter`).

Workers' own output (Ray Train's controller warnings, training workers' logs) reaches the driver
only when `ray.init(log_to_driver=True)`; the entry points pass `verbose` there (`log_to_driver`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator

from bootfinetune.training.progress import BarDrawer, BoardReader, bars_enabled

log = logging.getLogger("bootfinetune.progress")

LINE_EVERY_S = 30.0
"""Seconds between two progress lines of a stage that has not crossed a tenth of its work since the last one;
from two minutes into the stage, a quarter of its time so far (`SPACING`) when that is longer."""
SPACING = 0.25
"""Between tenths, a line at most every `SPACING` x the stage's time so far (once that exceeds `LINE_EVERY_S`)."""
STEPS = 10
"""Progress lines per stage when each tenth of the work comes sooner than `LINE_EVERY_S`."""
REPEATED = ("LM response was truncated",)
"""Starts of DSPy warnings logged once per call: `RepeatFilter` lets the first of each through."""


def interactive() -> bool:
    """Whether output goes to a person at a terminal (live bars) or to a log (lines).

    `BOOTFINETUNE_PROGRESS=1` forces bars, `=0` lines; otherwise stderr being a terminal decides
    (the one rule, `training.progress.bars_enabled`).
    """
    return bars_enabled()


class ProgressLine:
    """Progress of one stage as log lines: at most `STEPS` + a few, never a redraw.

    >>> p = ProgressLine("bootstrap", 200, every_s=1e9, enabled=True)
    >>> [p.update(n) for n in (5, 19, 20, 21, 200)]
    [None, None, 'bootstrap: 20/200 (10%)', None, 'bootstrap: 200/200 (100%)']
    """

    def __init__(self, label: str, total: int, *, unit: str = "", every_s: float = LINE_EVERY_S,
                 enabled: bool | None = None) -> None:
        self.label, self.total, self.unit, self.every_s = label, max(0, total), unit, every_s
        self.enabled = (not interactive()) if enabled is None else enabled
        self._tenth = 0
        self._started = self._last = time.monotonic()
        self._done = 0
        self._said = 0  # what the last line said: a stalled stage gets no line repeating it

    def update(self, done: int, total: int | None = None, detail: str = "") -> str | None:
        """Records `done` of `total` units; logs (and returns) a line when one is due."""
        if total is not None:
            self.total = total
        self._done = done
        if not self.enabled or self.total <= 0 or done == self._said:
            return None
        tenth = min(STEPS, done * STEPS // self.total)
        now = time.monotonic()
        if tenth <= self._tenth and now - self._last < max(self.every_s, SPACING * (now - self._started)):
            return None
        self._tenth, self._last, self._said = max(tenth, self._tenth), now, done
        line = f"{self.label}: {done}/{self.total}{' ' + self.unit if self.unit else ''} ({100 * done // self.total}%)"
        line += f", {detail}" if detail else ""
        log.info("%s", line)
        return line

    def advance(self, n: int = 1, detail: str = "") -> str | None:
        """`update(done + n)`."""
        return self.update(self._done + n, detail=detail)


class BoardLines(BoardReader):
    """Training progress as lines: the `ProgressBoard` the training workers report to, read by a thread.

    The non-interactive twin of `training.progress.BarDrawer` (same board, same `name`/`namespace`
    for the workers): a line per model each tenth of its steps or `LINE_EVERY_S`, and one at the end.
    """

    def __init__(self, keys: list[str], poll_s: float = 1.0) -> None:
        super().__init__(keys, poll_s)
        self._lines = {k: ProgressLine(f"finetune {k}", 0, unit="steps", enabled=True) for k in keys}

    def _show(self) -> None:
        for key, info in self._latest().items():
            if key in self._lines:
                self._lines[key].update(info["step"], info["total"],
                                        f"epoch {info['epoch']}/{info['epochs']}, loss {info['loss']:.4f}")


def progress_drawer(keys: list[str]) -> Any:
    """Bars on a terminal (`BarDrawer`), lines elsewhere (`BoardLines`)."""
    return BarDrawer(keys) if interactive() else BoardLines(keys)


class RepeatFilter(logging.Filter):
    """Lets the first record of each `REPEATED` message through and counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for start in REPEATED:
            if message.startswith(start):
                seen = start in self.held
                self.held[start] = self.held.get(start, 0) + seen
                return not seen
        return True

    def report(self) -> None:
        """Logs how many records were held back, and forgets them."""
        for start, n in self.held.items():
            if n:
                log.warning("%d more warning(s) '%s...' not shown (verbose=True shows them all)", n, start)
        self.held.clear()


class _RayDataConsole(logging.Filter):
    """Ray Data's console handler: warnings and errors only (INFO stays in its log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "Progress bars disabled" not in record.getMessage()


_REPEATS = RepeatFilter()
_RAY_DATA_CONSOLE = _RayDataConsole()


def bars_off() -> None:
    """Progress bars that redraw (Ray Data's, Hugging Face's weight loading and writing) off in this process."""
    import ray.data
    from transformers.utils import logging as hf_logging

    ray.data.DataContext.get_current().enable_progress_bars = False
    hf_logging.disable_progress_bar()


def set_console_output(verbose: bool) -> None:
    """Sets this process's console output for a compile (see the module docstring); idempotent.

    Without a terminal, bars are off (`bars_off`). `verbose=True` takes the filters off again. The count of
    held-back warnings starts again at zero: `report_held` reports this compile's, not an earlier one's in this
    process (a notebook, a test session).
    """
    _REPEATS.held.clear()
    if not interactive():
        bars_off()
    dspy_lm = logging.getLogger("dspy.clients.lm")  # a logger's filter sees only its own records
    consoles = [h for h in logging.getLogger("ray.data").handlers  # its file handler keeps every line
                if isinstance(h, logging.StreamHandler)]
    for handler in consoles:
        (handler.removeFilter if verbose else handler.addFilter)(_RAY_DATA_CONSOLE)  # added once at most
    (dspy_lm.removeFilter if verbose else dspy_lm.addFilter)(_REPEATS)


class _Counted(logging.Filter):
    """Drops DSPy's per-call truncation warnings: what they say is counted elsewhere (`counted_cuts`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(REPEATED[0])


@contextlib.contextmanager
def counted_cuts() -> Iterator[None]:
    """While open, DSPy's "LM response was truncated" warnings are not logged in this process: the caller counts
    the answers cut (the evaluate stage's `cut`, from each call's finish reason) and reports them once."""
    dspy_lm, counted = logging.getLogger("dspy.clients.lm"), _Counted()
    dspy_lm.filters.insert(0, counted)  # first: `RepeatFilter` would count them as held back otherwise
    try:
        yield
    finally:
        dspy_lm.removeFilter(counted)


def report_held() -> None:
    """Logs the count of repeated warnings `set_console_output` held back."""
    _REPEATS.report()
