"""Teacher traces are kept by what produces them, counted by the teacher server itself.

The teacher LM has `cache=False`, so DSPy's cache cannot be what keeps a count at 0: every
count here is the HTTP requests the scripted teacher on 127.0.0.1 answered.
"""

import json
import logging
import os
import socket
import threading

import pytest

from bootfinetune import BootstrapFinetune
from bootfinetune.entrypoints.cli import main
from bootfinetune.errors import RunBusyError
from bootfinetune.run.jsonio import read_json
from bootfinetune.run.rundir import RunDir
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.programs import TwoStep, two_step_examples, two_step_metric, two_step_teacher_calls

pytestmark = pytest.mark.integration
TRAIN = dict(bsize=4, epochs=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_causal(tmp_path_factory.mktemp("models") / "tiny-llama"))


def teleprompter(teacher_lm, storage, **options):
    return BootstrapFinetune(metric=two_step_metric, teacher_settings={"lm": teacher_lm}, storage_path=str(storage),
                             max_tokens=16, **options)


def manifest(run):
    return read_json(run.model_dir("all") / "manifest.json")


def compile_together(teleprompters, **compile_args):
    """Starts one compile of TwoStep per teleprompter at the same instant, in threads; returns each one's
    outcome: the teleprompter when its compile finished, else the RunBusyError it raised."""
    start, outcome = threading.Barrier(len(teleprompters)), {}

    def run(tp):
        start.wait()
        try:
            tp.compile(TwoStep(), **compile_args)
            outcome[id(tp)] = tp
        except RunBusyError as e:
            outcome[id(tp)] = e

    threads = [threading.Thread(target=run, args=(tp,)) for tp in teleprompters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    return [outcome[id(tp)] for tp in teleprompters]


def test_changing_only_lr_calls_the_teacher_zero_times_and_trains_a_new_model(
        ray_cluster, teacher_server, teacher_lm, tiny, tmp_path):
    trainset = two_step_examples(8)
    # Two compiles of one run started together (one writer per run): one runs, the other stops at once
    # naming it, and only the one that ran asks the teacher.
    outcomes = compile_together([teleprompter(teacher_lm, tmp_path) for _ in range(2)], trainset=trainset,
                                target=tiny, lr=1e-3, **TRAIN)
    [first] = [o for o in outcomes if isinstance(o, BootstrapFinetune)]
    [busy] = [o for o in outcomes if isinstance(o, RunBusyError)]
    assert (f"run {first.run_dir.location} is being written by a compile, pid {os.getpid()} on "
            f"{socket.gethostname()}, started 20") in str(busy) and "writer_wait_s" in str(busy)
    assert (first.run_dir.root / "writer.lock").read_text() == ""  # released at the end
    calls = teacher_server.calls
    assert calls == first.report["stages"]["bootstrap"]["teacher_calls"] > 0

    second = teleprompter(teacher_lm, tmp_path)
    second.compile(TwoStep(), trainset=trainset, target=tiny, lr=2e-3, **TRAIN)
    print(f"\nFIGURE lr-only change: {teacher_server.calls - calls} teacher calls (first compile: {calls})")
    assert teacher_server.calls == calls  # the figure: 0 teacher calls
    boot = second.report["stages"]["bootstrap"]
    assert (boot["teacher_calls"], boot["reused"], boot["kept"]) == (0, 8, first.report["stages"]["bootstrap"]["kept"])
    assert second.run_dir.root != first.run_dir.root  # a new run: the first model is kept
    assert second.run_dir.data_file("all").read_bytes() == first.run_dir.data_file("all").read_bytes()
    assert manifest(first.run_dir)["train_config"]["lr"] == 1e-3
    assert manifest(second.run_dir)["train_config"]["lr"] == 2e-3  # trained, not read back
    assert read_json(second.run_dir.config_json)["trace_store"] == read_json(first.run_dir.config_json)["trace_store"]

    # `bootfinetune retrain` (the finetune job) trains the finished run's traces with another lr into a sibling run.
    assert main(["retrain", "--run-dir", str(first.run_dir.root), "--set", "lr=3e-3"]) == 0
    runs = {p for p in tmp_path.iterdir() if p.name != "traces"}
    assert len(runs) == 3 and {first.run_dir.root, second.run_dir.root} < runs
    retrained = RunDir((runs - {first.run_dir.root, second.run_dir.root}).pop())
    assert manifest(retrained)["train_config"]["lr"] == 3e-3 and retrained.program_json.exists()
    assert manifest(first.run_dir)["train_config"]["lr"] == 1e-3  # the old run is untouched
    assert teacher_server.calls == calls
    # A compile with those options finds that run finished: no teacher call, no training.
    third = teleprompter(teacher_lm, tmp_path)
    third.compile(TwoStep(), trainset=trainset, target=tiny, lr=3e-3, **TRAIN)
    assert third.run_dir.root == retrained.root
    assert manifest(third.run_dir)["finished_at"] == manifest(retrained)["finished_at"]
    assert teacher_server.calls == calls


def test_grown_trainset_and_valset_call_the_teacher_for_the_new_examples_only(
        ray_cluster, teacher_server, teacher_lm, tiny, tmp_path):
    trainset, valset = two_step_examples(10), two_step_examples(4, offset=200)
    new_train, new_val = two_step_examples(4, offset=100), two_step_examples(2, offset=300)
    teleprompter(teacher_lm, tmp_path / "runs").prepare(TwoStep(), trainset=trainset, valset=valset, target=tiny)
    before = teacher_server.calls
    grown = teleprompter(teacher_lm, tmp_path / "runs").prepare(
        TwoStep(), trainset=trainset + new_train, valset=valset + new_val, target=tiny)
    made = teacher_server.calls - before
    expected = two_step_teacher_calls(new_train + new_val)
    print(f"\nFIGURE trainset +4, valset +2: {made} teacher calls; those 6 examples alone: {expected}")
    assert made == expected > 0
    assert (grown.bootstrap.summary.reused, grown.val_bootstrap.summary.reused) == (10, 4)
    assert grown.bootstrap.summary.examples == 14 and grown.val_bootstrap.summary.examples == 6
    # The run's records are the same as a run that asked the teacher for everything.
    fresh = teleprompter(teacher_lm, tmp_path / "fresh").prepare(
        TwoStep(), trainset=trainset + new_train, valset=valset + new_val, target=tiny)
    assert grown.run.data_file("all").read_bytes() == fresh.run.data_file("all").read_bytes()
    assert (grown.run.bootstrap_dir / "train.calls.jsonl").read_bytes() == \
        (fresh.run.bootstrap_dir / "train.calls.jsonl").read_bytes()


def test_fixed_run_name_with_other_inputs_rebootstraps_what_changed_and_retrains(
        ray_cluster, teacher_server, teacher_lm, tiny, tmp_path, caplog):
    trainset, added = two_step_examples(8), two_step_examples(3, offset=100)
    first = teleprompter(teacher_lm, tmp_path / "runs", run_name="fixed")
    first.compile(TwoStep(), trainset=trainset, target=tiny, **TRAIN)
    trained = manifest(first.run_dir)
    before = teacher_server.calls
    with caplog.at_level(logging.INFO, logger="bootfinetune"):
        again = teleprompter(teacher_lm, tmp_path / "runs", run_name="fixed")
        again.compile(TwoStep(), trainset=trainset + added, target=tiny, lr=1e-4, **TRAIN)
    made = teacher_server.calls - before
    assert again.run_dir.root == first.run_dir.root
    assert made == two_step_teacher_calls(added) > 0
    assert "run fixed was made from other inputs: trainset changed: 3 new, 0 removed example(s)" in caplog.text
    assert "options changed: lr 5e-05 -> 0.0001" in caplog.text
    assert "models/all retrained: all.jsonl changed" in caplog.text and "lr 5e-05 -> 0.0001" in caplog.text
    retrained = manifest(again.run_dir)
    assert retrained["finished_at"] > trained["finished_at"] and retrained["train_config"]["lr"] == 1e-4
    summary = read_json(again.run_dir.bootstrap_dir / "train.summary.json")
    assert (summary["examples"], summary["reused"]) == (11, 8)
    indexes = {json.loads(line)["example_index"] for line in again.run_dir.data_file("all").read_text().splitlines()}
    assert {8, 9, 10} & indexes  # the new examples reached the training data
