"""The teacher's rate limit: one budget shared by every bootstrap actor on the cluster, and 429s obeyed.

Two options of `BootstrapConfig` set a budget: `max_calls_per_second` (teacher requests) and
`max_tokens_per_minute` (prompt plus completion tokens), as a provider states its limits. The driver
then starts one `TeacherBudget` actor for the run; every actor's runner asks it when each example may
start (`Pacer.admit`), so the whole cluster keeps to the budget however many actors there are.

The budget paces each LM call evenly, at 95% of the stated limit (`HEADROOM`), just before it goes out
(GCRA: each reservation moves a theoretical arrival time forward by its cost over the rate) and never
bursts, so a provider that enforces its limit as a token bucket sees no 429 in the first second either.
A call reserves the tokens calls have used on average so far and settles the difference after, from
what DSPy reported (`TeacherUsage`), so prompts that grow still average out to the budget.

A 429 that reaches us (DSPy retries each call itself, honouring `Retry-After`, and gives up after
`num_retries`) is obeyed with or without a budget: its example runs again (up to
`RATE_LIMIT_RETRIES` times, not counted as a failure) after the provider's `Retry-After`, the
shared budget pauses every actor for that long, and the actor halves the calls it keeps in flight.
Each success then lets one more back in, up to `num_threads` (additive increase, multiplicative
decrease).

Every wait a Retry-After imposes is capped (`max_retry_after_s`, 60 s by default): the pause above, and
the wait of DSPy's own retries, which honours the header as it is (`cap_dspy_retry_waits`): a provider
answering `Retry-After: 3600` would otherwise hold each call an hour per retry.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from dspy.utils.callback import BaseCallback

logger = logging.getLogger(__name__)

RATE_LIMIT_RETRIES = 5
"""Times an example that ended in a rate-limit error runs again before it is a failure record."""
DEFAULT_BACKOFF_S = 1.0
"""Pause after a 429 that names no Retry-After."""
HEADROOM = 0.95
"""The share of a stated limit the budget paces to. At exactly the limit a provider's bucket stays empty,
so one late-woken thread's call, or one retry DSPy makes after a 429 (which no budget sees), takes the
next call's place and the 429s go on; the spare 5% lets them die out."""


class BudgetClock:
    """Paces reservations of (calls, tokens) to a rate; pure logic, so it runs in a Ray actor or here.

    >>> clock = BudgetClock(calls_per_second=10, headroom=1.0)
    >>> [round(clock.reserve(1, 0, now=0.0), 2) for _ in range(3)]
    [0.0, 0.1, 0.2]
    >>> clock.pause(1.0, now=0.0); round(clock.reserve(1, 0, now=0.0), 2)
    1.0
    """

    def __init__(self, calls_per_second: float | None = None, tokens_per_minute: float | None = None,
                 headroom: float = HEADROOM):
        self.call_cost = 1.0 / (calls_per_second * headroom) if calls_per_second else 0.0
        self.token_cost = 60.0 / (tokens_per_minute * headroom) if tokens_per_minute else 0.0
        self.next_free = 0.0  # the theoretical time the budget is free again
        self.reserved = {"calls": 0.0, "tokens": 0.0}
        self.pauses = 0

    def reserve(self, calls: float, tokens: float, now: float | None = None) -> float:
        """Books `calls` and `tokens`; returns the seconds to wait before they may start."""
        now = time.monotonic() if now is None else now
        start = max(now, self.next_free)
        self.next_free = start + calls * self.call_cost + tokens * self.token_cost
        self.reserved["calls"] += calls
        self.reserved["tokens"] += tokens
        return start - now

    def reserve_at(self, calls: float, tokens: float) -> tuple[float, float]:
        """`reserve`, for a caller in another process: (seconds to wait, the start as Unix time on this host)."""
        delay = self.reserve(calls, tokens)
        return delay, time.time() + delay

    def settle(self, calls: float, tokens: float) -> None:
        """Charges (or refunds, when negative) what an example used beyond what it reserved."""
        self.next_free += calls * self.call_cost + tokens * self.token_cost
        self.reserved["calls"] += calls
        self.reserved["tokens"] += tokens

    def pause(self, seconds: float, now: float | None = None) -> None:
        """Nothing starts for `seconds` (a provider's Retry-After)."""
        now = time.monotonic() if now is None else now
        self.next_free = max(self.next_free, now + seconds)
        self.pauses += 1

    def stats(self) -> dict[str, Any]:
        return {"calls": round(self.reserved["calls"], 3), "tokens": round(self.reserved["tokens"], 1),
                "pauses": self.pauses}


class TeacherBudget(BudgetClock):
    """The budget as the cluster shares it: one Ray actor per run (`start_budget`)."""


def start_budget(calls_per_second: float | None, tokens_per_minute: float | None) -> Any:
    """The run's shared budget actor (on the driver's node, no CPU reserved), or None without a limit."""
    if not calls_per_second and not tokens_per_minute:
        return None
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)(TeacherBudget).options(
        scheduling_strategy=here).remote(calls_per_second, tokens_per_minute)
    logger.info("bootstrap: teacher budget %s shared by every actor",
                " and ".join(f"{v:g} {unit}" for v, unit in ((calls_per_second, "calls/s"),
                                                            (tokens_per_minute, "tokens/min")) if v))
    return actor


def stop_budget(budget: Any) -> None:
    """Ends the run's budget actor (its reservations are done); a `BudgetClock` or None needs nothing."""
    if budget is not None and not isinstance(budget, BudgetClock):
        import ray

        ray.kill(budget)


def cap_dspy_retry_waits(max_s: float) -> bool:
    """Caps the wait before each of DSPy's own retries of an LM call at `max_s` seconds, in this process.

    DSPy 3.4 waits what the error's Retry-After says (`dspy.clients.execution._delay`), with no upper bound,
    and has no setting for one; the bootstrap actors wrap that function (once, a later call sets the cap).
    Returns False, with a warning, when this DSPy has no such function (the cap does not hold there).
    """
    from dspy.clients import execution

    delay = getattr(execution, "_delay", None)
    if not callable(delay):
        logger.warning("bootstrap: this DSPy has no dspy.clients.execution._delay; a teacher's Retry-After "
                       "is not capped inside DSPy's own retries (max_retry_after_s=%g applies to our pauses)", max_s)
        return False
    original = getattr(delay, "__wrapped__", delay)

    def capped(exc: BaseException, attempt: int) -> float:
        return min(original(exc, attempt), max_s)

    capped.__wrapped__ = original  # type: ignore[attr-defined]
    execution._delay = capped
    return True


def rate_limited(exc: BaseException) -> float | None:
    """The Retry-After (seconds, 0.0 when none was given) of a rate-limit error; None for other errors."""
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if status != 429 and "RateLimit" not in type(exc).__name__:
        return None
    try:
        retry_after = float(getattr(exc, "retry_after", None) or 0.0)
    except (TypeError, ValueError):
        retry_after = 0.0
    return retry_after if math.isfinite(retry_after) and retry_after > 0 else 0.0


def wait_for_start(delay: float, start: float, sent: float, received: float) -> float:
    """Seconds from `received` until a call reserved remotely may start.

    The budget booked it `delay` seconds after the reservation reached it, at Unix time `start` on the
    budget's host; the reservation was sent at `sent` and its reply `received` here. The booked start lies in
    [sent + delay, received + delay] on this clock: waiting `delay` from the reply (the latest end) would add the
    reply's latency to every call, and replies that come back late and unevenly (a busy start) would send calls
    out bunched. So the budget's own clock places it, kept inside that interval, where clocks that disagree
    (another node) cannot move a call earlier than the reservation allows.

    >>> wait_for_start(1.0, start=101.0, sent=100.0, received=100.3)  # clocks agree: 0.3 s of latency saved
    0.7
    >>> wait_for_start(1.0, start=95.0, sent=100.0, received=100.3)  # a clock 5 s behind: the earliest bound
    0.7
    >>> wait_for_start(1.0, start=109.0, sent=100.0, received=100.3)  # a clock ahead: never later than delay
    1.0
    """
    booked = min(max(start, sent + delay), received + delay)
    return max(0.0, round(booked - received, 6))


class Pacer:
    """One actor's side of the teacher's limits: paces each call to the budget and adapts calls in flight.

    Each LM call waits for the budget just before it goes out (`before_call`, from `BudgetCallback`) and
    settles its tokens after (`after_call`, from `TeacherUsage`); each example takes a place in flight
    (`admit`) and frees it (`release`), which is where 429s shrink the places.

    Args:
        budget: The `TeacherBudget` actor, a `BudgetClock` (in one process), or None (no budget: only
            429s are obeyed).
        max_in_flight: The actor's slots (`num_threads`): the ceiling of examples in flight.
        max_pause: The longest pause a Retry-After imposes (`max_retry_after_s`).
    """

    def __init__(self, budget: Any, max_in_flight: int, max_pause: float = 60.0):
        self.budget = budget
        self.max_pause = max_pause
        self.max_in_flight = max_in_flight
        self.limit = max_in_flight
        self.in_flight = 0
        self.successes = 0
        self.calls = 0
        self.tokens = 0
        self.throttled = 0
        self.lowest = max_in_flight
        """The fewest examples in flight this actor has kept since it started (after 429s)."""
        self._paused_until = 0.0
        self._changed: asyncio.Condition | None = None
        self._loop: Any = None

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a sync runner gets a fresh event loop per call
            self._loop, self._changed = loop, asyncio.Condition()
        return self._changed

    def tokens_per_call(self) -> float:
        return self.tokens / self.calls if self.calls else 0.0

    def before_call(self) -> None:
        """Blocks the calling thread until the budget lets one more call (and its tokens) go out."""
        if self.budget is None:
            return
        estimate = self.tokens_per_call()
        if isinstance(self.budget, BudgetClock):
            delay = self.budget.reserve(1, estimate)
        else:
            import ray

            sent = time.time()
            delay, start = ray.get(self.budget.reserve_at.remote(1, estimate))
            delay = wait_for_start(delay, start, sent, time.time())
        if delay > 0:
            time.sleep(delay)

    def after_call(self, tokens: int) -> None:
        """Settles a finished call's tokens against what `before_call` reserved for it."""
        estimate = self.tokens_per_call()
        self.calls += 1
        self.tokens += tokens
        if self.budget is not None and tokens != estimate and isinstance(self.budget, BudgetClock):
            self.budget.settle(0, tokens - estimate)
        elif self.budget is not None and tokens != estimate:
            self.budget.settle.remote(0, tokens - estimate)  # no reply awaited: the next reservation sees it

    async def admit(self) -> None:
        """Waits for a place in flight (and out of a pause after a 429)."""
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
        delay = self._paused_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def release(self, retry_after: float | None = None) -> None:
        """Frees an example's place; `retry_after` (seconds, 0.0 if none) when it ended rate limited."""
        if retry_after is not None:
            self.throttled += 1
            pause = min(retry_after or DEFAULT_BACKOFF_S, self.max_pause)
            self._paused_until = max(self._paused_until, time.monotonic() + pause)
            if isinstance(self.budget, BudgetClock):
                self.budget.pause(pause)
            elif self.budget is not None:
                self.budget.pause.remote(pause)
            self.limit, self.successes = max(1, self.limit // 2), 0
            self.lowest = min(self.lowest, self.limit)
            logger.warning("bootstrap: the teacher rate-limited a call (Retry-After %.2fs): %d example(s) in flight "
                           "in this actor now, pausing %.2fs", retry_after, self.limit, pause)
        else:
            self.successes += 1
            if self.limit < self.max_in_flight and self.successes >= self.limit:
                self.limit, self.successes = self.limit + 1, 0
        changed = self._condition()
        async with changed:
            self.in_flight -= 1
            changed.notify_all()


class BudgetCallback(BaseCallback):
    """The DSPy callback that holds each LM call until the budget lets it go (`Pacer.before_call`).

    Only set when a budget is: a callback makes DSPy inspect the arguments of every module, adapter and
    LM call, a cost worth paying only when the budget, not the client, sets the pace. It blocks its
    thread, so programs run on threads under a budget (`engine` "auto").
    """

    def __init__(self, pacer: Pacer):
        super().__init__()
        self.pacer = pacer

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.pacer.before_call()


