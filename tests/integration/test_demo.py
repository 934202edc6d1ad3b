"""`bootfinetune demo` on a small slice of its task: every stage runs and the reports are written."""

import argparse
import html.parser
import json
from pathlib import Path

import pytest

from bootfinetune.demo import run as demo
from bootfinetune.demo.task import CITIES, make_datasets, metric, teacher_script
from bootfinetune.run.jsonio import read_json

pytestmark = pytest.mark.integration


def test_datasets_are_deterministic_and_disjoint():
    train, val = make_datasets(500, 200)
    again, _ = make_datasets(500, 200)
    assert [e.message for e in train] == [e.message for e in again]
    assert not {e.message for e in train} & {e.message for e in val}
    assert len({e.city for e in train}) == len(CITIES)
    # The scripted teacher is right on most messages, wrong on a fixed few (the metric filters those).
    wrong = [e for e in train if teacher_script({"message": e.message}, ["city"])["city"] != e.city]
    assert 0 < len(wrong) < 0.1 * len(train)
    assert all(teacher_script({"city": c}, ["country"])["country"] == k for c, k in CITIES.items())


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_demo_runs_every_stage_and_writes_both_reports(ray_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BOOTFINETUNE_PROGRESS", "0")  # as in a log file or CI: lines, not bars
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--storage", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
                              "--train-size", "40", "--val-size", "12", "--epochs", "2", "--teacher-latency", "0"])
    assert demo.run_demo(args) == 0
    captured = capsys.readouterr()
    out = captured.out
    # Readable without a terminal: nothing redrawn, none of Ray Data's per-dataset lines, a bounded length.
    whole = captured.out + captured.err
    assert "\r" not in whole and "execution finished" not in whole and "Starting execution" not in whole
    assert len(whole.splitlines()) <= 60, whole
    progress = [line for line in out.splitlines() if line.startswith(("[bootfinetune] bootstrap: ",
                                                                     "[bootfinetune] finetune all: "))]
    assert progress and len(progress) == len(set(progress)) and len(progress) <= 2 * 11
    for stage in ("stage 1/6 checks", "stage 2/6 bootstrap", "stage 3/6 data", "stage 4/6 finetune",
                  "stage 5/6 rebind", "stage 6/6 evaluate", "metric after (finetuned)", "report.html:"):
        assert stage in out, stage
    html_path = Path(out.split("report.html: ")[1].split()[0])
    report = read_json(html_path.parent / "report.json")
    assert report["stages"]["bootstrap"]["examples"] == 40
    assert report["stages"]["bootstrap"]["teacher_calls"] == 80  # extract and locate, once per ticket
    assert 0 <= report["metric"]["after"] <= 1 and report["metric"]["teacher"] > 0.8
    # The student's tokens while scoring the valset, before and after: two calls an example (extract, locate)
    # at least, counted by the tokenizer, no price for a local model (null, not 0).
    for when in ("before", "after"):
        (model, usage), = report["stages"]["evaluate"]["usage"][when].items()
        assert usage["calls"] >= 2 * 12 and usage["prompt_tokens"] > 100 * 12 and usage["completion_tokens"] > 0
        assert usage["cost_usd"] is None, usage
    assert "student tokens (scoring)" in out and f"after {sum(v for k, v in usage.items() if k.endswith('_tokens'))} (" in out
    curve = report["stages"]["finetune"]["all"]["loss_curve"]
    assert len(curve) >= 2 and curve[0][0] < curve[-1][0]  # optimizer steps, increasing
    page = html_path.read_text()
    tags = _Tags()
    tags.feed(page)
    assert tags.tags.count("svg") == 2  # the metric bars and the loss curves
    assert "<path" in page and "<rect" in page and "<script" not in page
    assert f"{report['metric']['teacher']:.3f}" in page
    # The student was built once and is reused from the cache by the next run.
    student, reused = demo.build_student(tmp_path / "cache", make_datasets(40, 12)[0])
    assert reused and (student / "config.json").exists()
    assert json.loads((student / "bootfinetune_tiny.json").read_text())["args"]["hidden_size"] == demo.STUDENT["hidden_size"]
    assert metric  # the task's metric is importable by path for ray workers
