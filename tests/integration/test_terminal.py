"""A person at a terminal keeps live bars: the training bar redraws on a real pseudo-terminal, no progress lines."""

import fcntl
import logging
import os
import pty
import select
import struct
import sys
import termios
import time

import pytest

from bootfinetune.runtime import console
from bootfinetune.training.progress import BarDrawer, Reporter

pytestmark = pytest.mark.integration


def _read_all(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunks.append(os.read(fd, 65536))
        except OSError:
            break
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_live_training_bars_and_no_progress_lines(ray_cluster, monkeypatch):
    import ray.data

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal window's size
    terminal = os.fdopen(slave, "w", buffering=1)
    monkeypatch.delenv("BOOTFINETUNE_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", terminal)  # what a compile started from a shell writes to
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", True)
    records, handler = [], logging.Handler(logging.INFO)
    handler.emit = records.append
    progress_log = logging.getLogger("bootfinetune.progress")
    progress_log.addHandler(handler)
    try:
        assert console.interactive()  # decided by stderr being a terminal, no variable set
        console.set_console_output(verbose=False)
        assert context.enable_progress_bars  # Ray Data's bars stay live on a terminal
        drawer = console.progress_drawer(["all"])
        assert isinstance(drawer, BarDrawer)
        with drawer:
            # Rank 0 of a training job reports to the board by name, as from a Ray Train worker.
            reporter = Reporter(drawer.name, "all", drawer.namespace)
            for step in (5, 10, 20):
                reporter.report(step, 20, 1.0 / step, epoch=step // 10 + 1, epochs=2, force=True)
                time.sleep(drawer.poll_s * 3)  # the drawing thread polls the board every poll_s
        assert [p.update(n) for p in [console.ProgressLine("bootstrap", 10)] for n in range(11)] == [None] * 11
        terminal.flush()
        shown = _read_all(master)
    finally:
        progress_log.removeHandler(handler)
        terminal.close()
        os.close(master)
    assert "finetune all" in shown and "20/20" in shown and "loss 0.0500" in shown, shown
    assert shown.count("\r") >= 3, shown  # redrawn in place, once per new figure at least
    assert not [r for r in records if "finetune all:" in r.getMessage()]  # no progress lines beside the bar
