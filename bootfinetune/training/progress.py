"""Training progress a person can follow: a bar per model with its loss, drawn on the driver.

Training runs in Ray Train workers, possibly on other machines, so their progress cannot
be drawn where they run. Rank 0 of each job sends `(step, total, loss)` to a small Ray
actor (`ProgressBoard`) at most a few times a second; a thread on the driver reads the
board and draws one `tqdm` bar per model key. Without Ray (torchrun, one process) the loop
logs the same figures instead.

Bars are drawn when stderr is a terminal or `BOOTFINETUNE_PROGRESS=1`; `BOOTFINETUNE_PROGRESS=0` turns
them off (then `bootfinetune.runtime.console` prints a progress line at a bounded rate instead).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from typing import Any

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.5
"""Least time between two reports from one worker to the board."""
LOG_EVERY_S = 15.0
"""Least time between two progress log lines (without a board)."""


def bars_enabled() -> bool:
    """Whether the driver draws progress bars (see the module docstring)."""
    flag = os.environ.get("BOOTFINETUNE_PROGRESS", "")
    if flag in ("0", "1"):
        return flag == "1"
    return sys.stderr.isatty()


class ProgressBoard:
    """Latest progress per model key; runs as a Ray actor (see `start_board`)."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}

    def update(self, key: str, info: dict[str, Any]) -> None:
        self.latest[key] = info

    def read(self) -> dict[str, dict[str, Any]]:
        return dict(self.latest)


class Reporter:
    """Used inside the loop on rank 0: sends progress to the board, or logs it without Ray."""

    def __init__(self, board_name: str | None, key: str, namespace: str | None = None) -> None:
        self.key = key
        self._last = 0.0
        self._board = None
        if board_name:
            try:
                import ray

                self._board = ray.get_actor(board_name, namespace=namespace)
            except Exception as exc:  # progress is never worth failing a training run for
                log.warning("progress board %s not reachable (%s); progress goes to the log", board_name, exc)

    def due(self) -> bool:
        return time.time() - self._last >= (REPORT_EVERY_S if self._board is not None else LOG_EVERY_S)

    def report(self, step: int, total: int, loss: float, epoch: int, epochs: int, force: bool = False) -> None:
        if not self.due() and not (force and self._board is not None):
            return
        self._last = time.time()
        info = {"step": step, "total": total, "loss": round(loss, 5), "epoch": epoch, "epochs": epochs,
                "time": self._last}
        if self._board is not None:
            self._board.update.remote(self.key, info)  # fire and forget
        else:
            log.info("%s: step %d/%d, epoch %d/%d, loss %.4f", self.key, step, total, epoch, epochs, loss)


class BoardReader:
    """Driver side: creates the `ProgressBoard` actor the workers report to (by `name` in `namespace`) and
    shows its contents every `poll_s` on a thread until stopped; a subclass says how (`_show`, `_close`)."""

    def __init__(self, keys: list[str], poll_s: float = 0.5) -> None:
        import ray

        self.keys = keys
        self.poll_s = poll_s
        self.name = f"bootfinetune-progress-{uuid.uuid4().hex[:8]}"
        self.namespace = ray.get_runtime_context().namespace
        self._actor = ray.remote(num_cpus=0)(ProgressBoard).options(name=self.name).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._show()  # the final figures
            self._close()
        finally:
            ray.kill(self._actor)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._show()
            except Exception as exc:  # showing progress is never worth ending training for
                log.debug("progress: %s", exc)

    def _latest(self) -> dict[str, dict[str, Any]]:
        import ray

        return ray.get(self._actor.read.remote(), timeout=10)

    def _show(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass


class BarDrawer(BoardReader):
    """Live bars, one per model (a terminal)."""

    def __init__(self, keys: list[str], poll_s: float = 0.5) -> None:
        super().__init__(keys, poll_s)
        self._bars: dict[str, Any] = {}

    def _show(self) -> None:
        self._draw()

    def _close(self) -> None:
        for bar in self._bars.values():
            bar.close()

    def _draw(self) -> None:
        from tqdm.auto import tqdm

        latest = self._latest()
        for key in self.keys:
            info = latest.get(key)
            if info is None:
                continue
            bar = self._bars.get(key)
            if bar is None:
                bar = self._bars[key] = tqdm(total=info["total"], desc=f"finetune {key}", unit="step",
                                             position=len(self._bars), dynamic_ncols=True, leave=True)
            bar.total = info["total"]
            bar.n = info["step"]
            bar.set_postfix_str(f"epoch {info['epoch']}/{info['epochs']} loss {info['loss']:.4f}", refresh=False)
            bar.refresh()


class PhaseClock:
    """Seconds spent per phase of the steps (`LoopConfig.time_phases`); `lap(name)` charges the time since
    the previous lap to `name` (None: to nothing), after a device sync on a GPU."""

    def __init__(self, device: Any):
        self.seconds: dict[str, float] = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.cuda, self.last = getattr(device, "type", str(device)) == "cuda", time.perf_counter()

    def lap(self, name: str | None) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        if name is not None:
            self.seconds[name] += now - self.last
        self.last = now
