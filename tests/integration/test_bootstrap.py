"""Bootstrapping on a real local Ray cluster against a scripted teacher over HTTP on 127.0.0.1."""

import functools
import json
import tempfile
from pathlib import Path

import dspy
import pytest
from dspy.dsp.utils import dotdict

from bootfinetune import BootstrapError, BootstrapFinetune
from bootfinetune.run.jsonio import read_json, read_jsonl
from tests.programs import TwoStep, two_step_examples, two_step_metric

pytestmark = pytest.mark.integration


@functools.lru_cache(maxsize=1)
def tiny_target() -> str:
    """A real (tiny) model folder: prepare() checks the target loads before any teacher call."""
    from bootfinetune.testing.tiny_models import build_tiny_causal

    return str(build_tiny_causal(Path(tempfile.mkdtemp(prefix="bft-bootstrap-")) / "tiny"))


def prepare(teacher_lm, storage, trainset, **options):
    tp = BootstrapFinetune(metric=two_step_metric, teacher_settings={"lm": teacher_lm}, storage_path=str(storage),
                           **options)
    return tp.prepare(TwoStep(), trainset=trainset, target=tiny_target())


@pytest.mark.parametrize("multitask", [True, False])
def test_one_actor_and_four_actors_give_identical_data(ray_cluster, teacher_lm, tmp_path, multitask):
    trainset = two_step_examples(48)
    one = prepare(teacher_lm, tmp_path / "one", trainset, num_actors=1, batch_size=4, multitask=multitask)
    four = prepare(teacher_lm, tmp_path / "four", trainset, num_actors=4, batch_size=4, multitask=multitask)
    assert one.run.name == four.run.name  # resources do not change what a run produces
    keys = ["all"] if multitask else ["rewrite", "answer.predict"]
    assert sorted(one.data) == sorted(keys)
    for key in keys:
        a, b = one.run.data_file(key).read_bytes(), four.run.data_file(key).read_bytes()
        assert a == b and len(a) > 0
        indexes = [r["example_index"] for r in read_jsonl(one.run.data_file(key))]
        assert indexes == sorted(indexes)
    # 48 examples: 7 take the branch (no answer call), 8 get a wrong answer and are dropped.
    summary = one.bootstrap.summary
    assert (summary.examples, summary.kept, summary.failed) == (48, 40, 0)
    assert summary.per_predictor == {"rewrite": 80, "answer.predict": 33}
    if not multitask:
        assert {r["predictor"] for r in read_jsonl(one.run.data_file("rewrite"))} == {"rewrite"}


def test_second_run_calls_the_teacher_zero_times(ray_cluster, teacher_server, teacher_lm, tmp_path):
    trainset = two_step_examples(20)
    first = prepare(teacher_lm, tmp_path, trainset)
    calls_after_first = teacher_server.calls
    assert calls_after_first == first.bootstrap.summary.teacher_calls > 0
    second = prepare(teacher_lm, tmp_path, trainset)
    assert teacher_server.calls == calls_after_first
    assert second.bootstrap.resumed and second.run.root == first.run.root
    assert second.run.data_file("all").read_bytes() == first.run.data_file("all").read_bytes()
    # The run directory follows the documented layout.
    names = {p.name for p in first.run.root.iterdir()}
    assert {"config.json", "bootstrap", "data", "report.json"} <= names
    report = read_json(first.run.report_json)
    assert report["stages"]["bootstrap"]["kept"] == first.bootstrap.summary.kept
    assert report["stages"]["data"]["keys"]["all"]["records"] == len(read_jsonl(first.run.data_file("all")))
    # A different trainset is a different run.
    third = prepare(teacher_lm, tmp_path, two_step_examples(21))
    assert third.run.root != first.run.root


def test_interrupted_run_resumes_where_it_stopped(ray_cluster, teacher_server, teacher_lm, tmp_path):
    trainset = two_step_examples(12)
    done = prepare(teacher_lm, tmp_path, trainset)
    store = Path(read_json(done.run.config_json)["trace_store"])
    [results] = (store / "results").glob("*.jsonl")  # one writer: one results file
    lines = results.read_text().splitlines()
    assert len(lines) == 12
    # Turn the finished run into one cut off after 5 examples, the 6th line half written.
    (done.run.bootstrap_dir / "train.summary.json").unlink()
    results.write_text("".join(line + "\n" for line in lines[:5]) + lines[5][:20])
    before = teacher_server.calls
    resumed = prepare(teacher_lm, tmp_path, trainset)
    done_keys = {json.loads(line)["example"] for line in lines[:5]}
    from bootfinetune.stages.traces import example_key

    expected_calls = sum(3 if e.text[:4] != "skip" else 2 for e in trainset if example_key(e) not in done_keys)
    assert teacher_server.calls - before == expected_calls
    assert resumed.bootstrap.summary.reused == 5 and resumed.bootstrap.summary.teacher_calls == expected_calls
    assert resumed.run.data_file("all").read_bytes() == done.run.data_file("all").read_bytes()


def test_failures_are_counted_below_max_errors_and_stop_above(ray_cluster, teacher_lm, tmp_path):
    boom = [dspy.Example(text=f"boom {i}", answer="x").with_inputs("text") for i in range(3)]
    trainset = two_step_examples(10) + boom
    ok = prepare(teacher_lm, tmp_path / "ok", trainset, max_errors=3)
    assert ok.bootstrap.summary.failed == 3
    assert sorted(f.example_index for f in ok.bootstrap.failures) == [10, 11, 12]
    failures = read_jsonl(ok.run.bootstrap_dir / "train.failures.jsonl")
    assert all(f["error_type"] and f["message"] for f in failures)
    for path in ok.run.root.rglob("*"):
        if path.is_file():
            assert "sk-test-secret-123456" not in path.read_text(errors="ignore"), path
    with pytest.raises(BootstrapError) as err:
        prepare(teacher_lm, tmp_path / "stop", trainset, max_errors=2)
    assert "more than max_errors=2" in str(err.value) and "example 1" in str(err.value)


def test_dspy_configure_settings_reach_the_actors(ray_cluster, teacher_server, teacher_lm, tmp_path):
    class Retrieve2(dspy.Module):
        def __init__(self):
            super().__init__()
            self.retrieve = dspy.Retrieve(k=2)
            self.rewrite = dspy.Predict("text -> rewritten")

        def forward(self, text):
            passages = self.retrieve(text).passages
            return self.rewrite(text=text + " | " + " ".join(passages))

    def corpus_rm(query, k=3, **kwargs):
        return [dotdict(long_text=f"passage-{j}-for-{query.split()[-1]}") for j in range(k)]

    class MarkedAdapter(dspy.ChatAdapter):
        def format_task_description(self, signature):
            return "MARKED. " + super().format_task_description(signature)

    trainset = [dspy.Example(text=f"q {i}").with_inputs("text") for i in range(6)]
    with dspy.context(lm=teacher_lm, rm=corpus_rm, adapter=MarkedAdapter()):
        prepared = BootstrapFinetune(storage_path=str(tmp_path)).prepare(Retrieve2(), trainset=trainset,
                                                                         target=tiny_target())
    assert prepared.bootstrap.summary.kept == 6
    rewritten = [c.outputs["rewritten"] for c in prepared.bootstrap.calls]
    assert "q 0 | passage-0-for-0 passage-1-for-0!" in rewritten
    assert all("MARKED." in request[0]["content"] for request in teacher_server.requests)
    assert "MARKED." in read_jsonl(prepared.run.data_file("all"))[0]["messages"][0]["content"]


def test_a_teacher_budget_is_shared_by_every_actor(ray_cluster, tmp_path):
    """Two actors x 8 slots against a teacher that allows 20 calls/s: the shared budget keeps the pool to it."""
    import subprocess
    import sys
    import urllib.request

    rate = 20.0
    # The provider in a process of its own, as a real one is (in this process its thread would share the GIL
    # with the driver's Ray Data loop). Its token bucket holds one second of calls, as providers quantize a
    # per-minute limit to a per-second one; with a third of a second (bench/bootstrap.py --rate-limit) the
    # first reservations of 16 slots starting at once on 2 busy cores came back bunched in 3 of 8 runs here and
    # drew 429s and their retries (issue 18 keeps that open).
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from bootfinetune.testing.faults import RateLimitedTeacherServer; "
         "from tests.programs import two_step_script; "
         f"s = RateLimitedTeacherServer(two_step_script, calls_per_second={rate}, burst={rate}, latency=0.05)"
         ".start(); print(s.url, flush=True); sys.stdin.read(); s.stop()"],
        cwd=Path(__file__).resolve().parents[2], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http"), url
        lm = dspy.LM("openai/limited", api_base=url, api_key="unused", cache=False, num_retries=3)
        prepared = prepare(lm, tmp_path, two_step_examples(30), num_actors=2, num_threads=8, batch_size=4,
                           max_calls_per_second=rate)
        stats = json.load(urllib.request.urlopen(url + "/stats"))  # the server's own record of each request
        accepted, limited = stats["accepted"], stats["limited"]
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    summary = prepared.bootstrap.summary
    assert (summary.examples, summary.failed) == (30, 0) and len(summary.nodes) >= 1
    assert summary.teacher_calls == len(accepted) > 60
    # The rate between the 10th and the 90th percentile call (the pool's start and drain left out): never
    # above the budget; near it unless the box is too starved for 16 slots to keep up (bench/bootstrap.py
    # --rate-limit measures it on a quiet box).
    low, high = accepted[len(accepted) // 10], accepted[len(accepted) * 9 // 10]
    achieved = (len(accepted) * 8 // 10) / (high - low)
    assert 0.75 * rate <= achieved <= 1.05 * rate, achieved
    assert len([t for t in limited if t > accepted[0] + 1.0]) <= max(3, len(accepted) // 20), (len(limited), limited)
