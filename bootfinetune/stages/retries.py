"""Bounded retries of the bootstrap workers: the property, and how Ray Data is set to keep it.

The property (whatever engine runs `TeacherRunner` must keep it; the tests check it, not the settings):

- An exception in the program or the metric is never retried by the engine: `TeacherRunner` turns it
  into a failure record. The teacher LM retries its own calls (`num_retries`), each bounded by `timeout`.
- A batch whose worker process dies runs at most `1 + TASK_RETRIES` times. The examples it did not
  bring back then run alone, one per worker at a time, again at most `1 + TASK_RETRIES` times each.
- An example whose worker still dies becomes a failure record (`error_type` "WorkerDied", naming the
  example), counted in `max_errors` like any other, and the run goes on: its batch-mates are kept.
- A worker restarts at most as many times as its pass has task attempts, so every pass ends.

Ray Data's actor pool restarts actors and retries their tasks without end unless told otherwise
(`max_restarts=-1`, `max_task_retries=-1`), which turns one example that kills its worker into a
run that never ends. `bounded_retries` sets those and the `DataContext` retry options explicitly.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from bootfinetune.common.redaction import redact
from bootfinetune.run.records import FailureRecord

TASK_RETRIES = 1
"""Times a task (a batch, or one example run alone) runs again on its restarted worker after the worker died."""
WORKER_DIED = "WorkerDied"
"""The `error_type` of an example whose worker process died every time it ran it."""


def bounded_retries(context: Any, max_tasks: int) -> dict[str, int]:
    """Sets a dataset's `DataContext` for bounded retries; returns the actor options for `map_batches`.

    Args:
        context: The dataset's `ray.data.DataContext` (changed in place).
        max_tasks: An upper bound on the map's tasks (its input blocks): actor restarts are bounded by
            the task attempts, so a worker killed by each of its tasks still lasts the whole pass.

    >>> class Context: pass
    >>> bounded_retries(Context(), 4)
    {'max_task_retries': 1, 'max_restarts': 8}
    """
    context.actor_task_retry_on_errors = False  # application errors are failure records, never re-run
    context.max_errored_blocks = -1  # a block that used up its attempts is dropped: its examples go on alone
    context.max_consecutive_actor_init_deaths = 0  # a worker that cannot even start fails the run, named
    return {"max_task_retries": TASK_RETRIES, "max_restarts": (1 + TASK_RETRIES) * max(1, max_tasks)}


class BlockErrors(logging.Handler):
    """Keeps the last error Ray Data logs for a block it drops (a dead worker's), to name it in failure records."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.last: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.last = record.exc_info[1]

    @contextlib.contextmanager
    def attached(self) -> Iterator["BlockErrors"]:
        """Listens to Ray Data's loggers while the block runs."""
        ray_data = logging.getLogger("ray.data")
        ray_data.addHandler(self)
        try:
            yield self
        finally:
            ray_data.removeHandler(self)


def worker_died(index: int, teacher: int, split: str, error: BaseException | None,
                secrets: list[str]) -> dict[str, Any]:
    """The result of example `index` (for `teacher`) whose worker process died every time it ran it, alone too.

    >>> worker_died(5, 0, "train", None, [])["failure"]["error_type"]
    'WorkerDied'
    """
    attempts = 1 + TASK_RETRIES
    cause = ""
    if error is not None:  # Ray's own words (which actor, how it ended): one line, kept short
        cause = f" Last worker error: {type(error).__name__}: {' '.join(str(error).split())[:400]}"
    message = (f"the worker process died every time it ran example {index} (up to {attempts} times in its "
               f"batch, then {attempts} times alone), without an exception the program could catch (a segfault, "
               f"an out-of-memory kill, os._exit, sys.exit or a signal in the program, its metric or a library "
               f"they call). The other examples of its batch were run again without it.{cause}")
    failure = FailureRecord(example_index=index, error_type=WORKER_DIED, message=redact(message, secrets)[:2000],
                            teacher=teacher, split=split, stage="program")
    return {"failure": failure.to_dict(), "teacher_calls": 0}
