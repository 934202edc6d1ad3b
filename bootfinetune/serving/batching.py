"""Gathers concurrent answers into batched `generate` calls, with a deadline and a cancel flag per answer.

A `MicroBatcher` owns up to `workers` threads (started when answers wait and every worker is busy,
gone after a few idle seconds): callers hand it an item and get a `Future`, so a server's event
loop can await it without holding a thread per request. A worker waits `wait_s` for company, then
runs the oldest waiting item together with others whose answer limits fall in the same bucket
(powers of two): a request for 8 tokens is never held in a batch that runs to 1,000, and with two
workers it is answered while that batch still runs.

The queue may be bounded (`max_pending`): a request that would pass it is refused at once with
`QueueFull`, which carries an estimate of when a place frees up (a server answers 503 + Retry-After),
rather than waiting behind a queue it cannot get through before its deadline.

Each item may carry a `limits.Control`: its deadline and a flag a server sets when the client goes
away. An item whose control has fired before its batch starts is not generated; during generation,
the engine's stopping criterion stops its row; either way its future raises `Cancelled` or
`DeadlineExceeded` instead of answering.

    batcher = MicroBatcher(run_batch, max_batch=8)           # run_batch(items, controls) -> results
    future = batcher.submit(("messages", 16, 0.0), Control.within(30.0))
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

from bootfinetune.serving.limits import Control, stopped_rows


class QueueFull(Exception):
    """The batcher's queue holds `max_pending` answers already; `retry_after` (whole seconds, 1 to 60) is when
    one is likely to have left it."""

    def __init__(self, retry_after: int):
        super().__init__(f"{retry_after} s")
        self.retry_after = retry_after


def bucket(limit: int) -> int:
    """Answers whose limits share a bucket may share a batch: 1, 2, 3-4, 5-8, 9-16, ...

    >>> [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 1000)]
    [0, 1, 2, 2, 3, 3, 4, 10]
    """
    return max(int(limit) - 1, 0).bit_length()


class MicroBatcher:
    """Runs `run_batch(items, controls) -> results` on a worker thread over batches of waiting items.

    Args:
        run_batch: Answers a batch; `items[i]` is `(messages, limit, temperature)`.
        max_batch: Most items per batch.
        wait_s: How long the worker waits for more items before running a batch.
        idle_s: A worker thread ends after this long without work (a new item starts one again).
        workers: Most batches running at once (`generate` calls share the model's weights).
        max_pending: Most answers waiting (not yet in a batch); None: no bound. A server sets it.
    """

    def __init__(self, run_batch: Callable[[list[Any], list[Control | None]], list[Any]], max_batch: int,
                 wait_s: float = 0.01, idle_s: float = 5.0, workers: int = 2, max_pending: int | None = None):
        self.run_batch, self.max_batch, self.wait_s, self.idle_s = run_batch, max_batch, wait_s, idle_s
        self.workers, self.max_pending = workers, max_pending
        self.batch_seconds = 1.0
        """A running mean of how long a batch takes (the Retry-After of a full queue is estimated from it)."""
        self._cond = threading.Condition()
        self._pending: list[tuple[Any, Control | None, Future]] = []
        self._running = 0  # worker threads alive
        self._idle = 0  # of which waiting for work
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        """Sizes of the latest batches run (for stats)."""
        self.generated = 0
        """Items generated so far (including those stopped early)."""

    def submit(self, item: Any, control: Control | None = None) -> Future:
        """Queues an item; the future gives its result (or raises its batch's error, `Cancelled`, `DeadlineExceeded`)."""
        return self.submit_all([item], control)[0]

    def submit_all(self, items: list[Any], control: Control | None = None) -> list[Future]:
        """Queues the items of one request together, or none of them: `QueueFull` when they would pass `max_pending`."""
        futures: list[Future] = [Future() for _ in items]
        with self._cond:
            if self.max_pending is not None and len(self._pending) + len(items) > self.max_pending:
                batches = (len(self._pending) + len(items)) / (self.max_batch * self.workers)
                raise QueueFull(min(60, max(1, math.ceil(batches * self.batch_seconds))))
            self._pending.extend((item, control, future) for item, future in zip(items, futures))
            if self._idle == 0 and self._running < self.workers:
                self._running += 1
                threading.Thread(target=self._work, name="bootfinetune-batcher", daemon=True).start()
            self._cond.notify()
        return futures

    def __call__(self, item: Any, control: Control | None = None) -> Any:
        """The result of one item, waiting for it."""
        return self.submit(item, control).result()

    def _take(self) -> list[tuple[Any, Control | None, Future]]:
        """The next batch (called with the lock held): the oldest item and others of its bucket."""
        live = []
        for entry in self._pending:
            if entry[2].cancelled():  # its caller stopped waiting
                continue
            problem = entry[1].problem() if entry[1] is not None else None
            if problem is not None:
                entry[2].set_exception(problem)  # never generated
            else:
                live.append(entry)
        if not live:
            self._pending = []
            return []
        first = bucket(live[0][0][1])
        batch = [e for e in live if bucket(e[0][1]) == first][: self.max_batch]
        taken = {id(e) for e in batch}
        self._pending = [e for e in live if id(e) not in taken]
        return [e for e in batch if e[2].set_running_or_notify_cancel()]

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._idle += 1
                    self._cond.wait(self.idle_s)
                    self._idle -= 1
                    if not self._pending:
                        self._running -= 1
                        return
            time.sleep(self.wait_s)  # let concurrent callers join this batch
            with self._cond:
                batch = self._take()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            controls = [c for _, c, _ in batch]
            started = time.monotonic()
            try:
                results = self.run_batch([item for item, _, _ in batch], controls)
            except BaseException as exc:  # hand the error to every caller of the batch
                for _, _, future in batch:
                    future.set_exception(exc)
                continue
            finally:
                self.generated += len(batch)
                self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (time.monotonic() - started)
            for (_, control, future), result in zip(batch, results):
                problem = control.problem() if control is not None else None
                if problem is not None:
                    future.set_exception(problem)
                else:
                    future.set_result(result)


class StopRows:
    """A `transformers` stopping criterion: a row ends at its own limit, or once its control fired.

    `generate` runs until every row has ended (a row that ended pads out the rest), so with answer
    limits bucketed a batch ends soon after its longest answer, and a request past its deadline or
    whose client left stops costing decoding steps at the next one.

    Args:
        limits: New tokens per row.
        controls: Per row, what may stop it early (None: nothing).
        start: Length of the sequences before the first new token (prompt width; 1 for a decoder start).
        on_step: Called once per decoding step (the engine counts them).
    """

    def __init__(self, limits: list[int], controls: list[Control | None], start: int,
                 on_step: Callable[[], None] = lambda: None):
        self.limits, self.controls, self.start, self.on_step = limits, controls, start, on_step

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.on_step()
        made = input_ids.shape[1] - self.start
        return torch.tensor([s or made >= limit for s, limit in zip(stopped_rows(self.controls), self.limits)],
                            dtype=torch.bool, device=input_ids.device)
