"""Console output without a terminal: bounded progress lines; Ray Data INFO lines and repeated DSPy warnings kept out."""

import logging

import pytest

from bootfinetune.runtime import console
from bootfinetune.runtime.console import ProgressLine, set_console_output


@pytest.fixture
def lines():
    """The progress logger's lines, from a handler on that logger itself (what earlier tests in the process
    did to the logging tree above it, or to the root's handlers, does not matter)."""
    logger = logging.getLogger("bootfinetune.progress")
    records, handler = [], logging.Handler(logging.INFO)
    handler.emit = records.append
    saved = (logger.level, logger.disabled)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.disabled = False
    yield lambda: [r.getMessage() for r in records]
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.disabled = saved[1]


def test_progress_lines_come_once_per_tenth_never_twice(lines):
    p = ProgressLine("bootstrap", 700, unit="teacher runs", every_s=1e9, enabled=True)
    for _ in range(700):
        p.advance()
    said = lines()
    assert said == [f"bootstrap: {70 * k}/700 teacher runs ({10 * k}%)" for k in range(1, 11)]
    assert len(set(said)) == len(said)


def test_a_slow_stage_gets_a_line_after_the_interval_and_a_terminal_gets_none(lines, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    p = ProgressLine("finetune all", 1000, every_s=30, enabled=True)
    for step in range(1, 50):  # 5% in 49 s: one line, when 30 s have passed
        now[0] = float(step)
        p.update(step, detail="loss 1.0")
    assert lines() == ["finetune all: 30/1000 (3%), loss 1.0"]
    now[0] = 200.0
    assert p.update(49) == "finetune all: 49/1000 (4%)"
    now[0] = 400.0
    assert p.update(49) is None  # stalled: no line repeating the last one
    monkeypatch.setenv("BOOTFINETUNE_PROGRESS", "1")  # a terminal: Ray Data's and the training bars are live
    silent = ProgressLine("bootstrap", 10)
    assert [silent.update(n) for n in range(11)] == [None] * 11


def test_quiet_ray_keeps_ray_data_info_and_repeated_dspy_warnings_off_the_console(monkeypatch):
    import ray.data

    monkeypatch.setenv("BOOTFINETUNE_PROGRESS", "0")
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", True)
    console.report_held()  # what an earlier compile in this process held back is reported and forgotten
    set_console_output(verbose=False)
    set_console_output(verbose=False)  # idempotent: one filter each
    assert context.enable_progress_bars is False
    # Ray Data's console handler writes to the stderr of the moment it was made (an earlier test's, in a
    # suite), so its filter is asked directly.
    consoles = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    assert consoles

    def shown(level, message):
        record = logging.LogRecord("ray.data._internal.execution.streaming_executor", level, __file__, 0, message,
                                   (), None)
        return all(h.filter(record) for h in consoles)

    assert not shown(logging.INFO, "Dataset dataset_1 execution finished in 1.00 seconds")
    assert not shown(logging.WARNING, "Progress bars disabled. To enable, set ...")
    assert shown(logging.WARNING, "a real Ray Data warning")
    dspy_lm = logging.getLogger("dspy.clients.lm")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    dspy_lm.addHandler(handler)
    try:
        for _ in range(40):
            dspy_lm.warning("LM response was truncated; increase max_tokens or inspect history.")
        dspy_lm.warning("another warning")
    finally:
        dspy_lm.removeHandler(handler)
    assert [r.getMessage()[:26] for r in records] == ["LM response was truncated;", "another warning"]
    said = []
    monkeypatch.setattr(console.log, "warning", lambda fmt, *a: said.append(fmt % a))
    console.report_held()
    assert said == ["39 more warning(s) 'LM response was truncated...' not shown (verbose=True shows them all)"]
    set_console_output(verbose=True)
    dspy_lm.addHandler(handler)
    try:
        dspy_lm.warning("LM response was truncated; again")
    finally:
        dspy_lm.removeHandler(handler)
    assert len(records) == 3  # verbose: every one shows


def test_between_tenths_lines_space_out_with_the_stage_time(lines, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    p = ProgressLine("finetune all", 10_000, every_s=30, enabled=True)
    for second in range(1, 3601):  # an hour at 1 step in 10 s: under a tenth of the work, progress every 10 s
        now[0] = float(second)
        if second % 10 == 0:
            p.update(second // 10)
    times = [int(m.split("/")[0].split()[-1]) * 10 for m in lines()]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[:4] == [30, 60, 90, 120]  # every 30 s while the stage is young
    assert all(gap >= 0.25 * a - 10 for a, gap in zip(times, gaps))  # then a quarter of the time so far
    assert 10 <= len(times) <= 20  # an hour: ~18 lines, where a line every 30 s would be 120
