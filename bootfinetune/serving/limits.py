"""What one request may ask of a model server, and what may stop its answer: one home for both servers.

The in-process `ModelServer` and `bootfinetune serve` (Ray Serve) apply the same limits:

- new tokens per answer: at most a ceiling (`token_ceiling`: from the longest answer seen in
  training, with headroom; `max_tokens_ceiling` overrides it). A request asking for more is
  clamped, not refused: DSPy and other OpenAI clients send a large `max_tokens` by default,
  and `finish_reason: "length"` tells them the answer was cut;
- answers per request: `n` at most `MAX_N`;
- request body: at most `MAX_BODY_BYTES`, checked against `Content-Length` and while reading, and all
  of the request (headers and body) within `READ_TIMEOUT_S` of its first byte;
- waiting: at most `QUEUED_BATCHES` batches' worth of answers queue; beyond, a 503 with Retry-After at once;
- time: each request has a deadline (`DEADLINE_S` by default); a `Control` carries it and a
  flag set when the client goes away, and generation stops for either.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

CEILING_CAP = 4096
"""The most new tokens a derived ceiling allows (`token_ceiling`)."""
MAX_N = 8
"""The most answers (`n`) one request may ask for."""
MAX_BODY_BYTES = 1 << 20
"""The largest request body a server reads (1 MiB); a larger one gets a 413."""
DEADLINE_S = 60.0
"""Seconds a request may take, queueing included, before it gets a 504."""
READ_TIMEOUT_S = 15.0
"""Seconds a client may take to send its request: its headers and body together, from its first byte."""
QUEUED_BATCHES = 8
"""Batches' worth of answers a server's batcher queues (8 x the batch size); a request beyond gets a 503 at once."""


def token_ceiling(longest_answer: int | None, fallback: int) -> int:
    """The most new tokens an answer may have: max(2L, L+64) for the longest training answer L, capped.

    A model without that record (a base model, a run from before it was kept) gets `fallback`.

    >>> token_ceiling(20, 512), token_ceiling(300, 512), token_ceiling(10_000, 512), token_ceiling(None, 512)
    (84, 600, 4096, 512)
    """
    if not longest_answer:
        return fallback
    return min(max(2 * longest_answer, longest_answer + 64), CEILING_CAP)


class Cancelled(Exception):
    """The client went away; the answer was not generated (or was stopped)."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its answer was done."""


@dataclass
class Control:
    """What may stop one answer early: a deadline (`time.monotonic()` seconds) and a cancel flag."""

    deadline: float | None = None
    """When the answer is no longer wanted (monotonic clock); None: no deadline."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the client went away."""

    @classmethod
    def within(cls, seconds: float | None) -> "Control":
        return cls(None if seconds is None else time.monotonic() + seconds)

    def left(self) -> float | None:
        """Seconds until the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def problem(self, now: float | None = None) -> Exception | None:
        """`Cancelled` or `DeadlineExceeded` once the answer is no longer wanted, else None."""
        if self.cancelled.is_set():
            return Cancelled("the client went away")
        if self.deadline is not None and (now if now is not None else time.monotonic()) >= self.deadline:
            return DeadlineExceeded("the request's deadline passed")
        return None


def stopped_rows(controls: list[Control | None]) -> list[bool]:
    """Per row of a batch: whether its answer is no longer wanted (for a stopping criterion)."""
    now = time.monotonic()
    return [c is not None and c.problem(now) is not None for c in controls]
