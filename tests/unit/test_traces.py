"""Trace identity and the trace store, without Ray."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from bootfinetune.config import Config
from bootfinetune.errors import ConfigError
from bootfinetune.run.jsonio import fingerprint, read_jsonl
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.trace_store import TraceStore, trace_id
from bootfinetune.stages.traces import example_changes, example_key, restamp, stable_identity, trace_identity
from tests.programs import TwoStep, two_step_examples, two_step_metric

REPO = Path(__file__).resolve().parents[2]


class CountingCallback(dspy.utils.callback.BaseCallback):
    """A callback with state that changes as it runs (and an address in its default repr)."""

    def __init__(self):
        self.seen = 0

    def on_lm_start(self, call_id, instance, inputs):
        self.seen += 1


class Glossary:
    """A plain user object in teacher_settings, as a custom setting a program might read."""

    def __init__(self, terms):
        self.terms = terms


def identity_here(seen: int = 0) -> dict:
    """The trace identity of a compile whose teacher_settings hold non-LM objects."""
    callback = CountingCallback()
    callback.seen = seen
    lm = dspy.LM("openai/teacher", api_base="http://127.0.0.1:9/v1", api_key="sk-never-in-identity", cache=False)
    settings = {"lm": lm, "adapter": dspy.JSONAdapter(), "callbacks": [callback], "glossary": Glossary(["a", "b"])}
    return trace_identity(student=TwoStep(), teachers=[TwoStep()], teacher_settings=settings,
                          settings={"adapter": dspy.XMLAdapter()}, metric=two_step_metric, metric_threshold=None)


def test_non_lm_teacher_settings_give_the_same_identity_in_another_process():
    here = identity_here()
    code = ("import json; from tests.unit.test_traces import identity_here; "
            "print(json.dumps(identity_here(), sort_keys=True))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert trace_id(there) == trace_id(here)
    assert " at 0x" not in json.dumps(here) and "sk-never-in-identity" not in json.dumps(here)
    # A callback's counters observe the teacher, they do not change its traces.
    assert trace_id(identity_here(seen=41)) == trace_id(here)


def test_what_changes_the_identity_and_what_does_not():
    base = identity_here()
    assert trace_id(base) == trace_id(identity_here())
    other_metric = trace_identity(student=TwoStep(), teachers=[TwoStep()], teacher_settings={}, settings={},
                                  metric=lambda e, p, t=None: True, metric_threshold=None)
    no_metric = trace_identity(student=TwoStep(), teachers=[TwoStep()], teacher_settings={}, settings={},
                               metric=None, metric_threshold=None)
    assert trace_id(other_metric) != trace_id(no_metric)
    threshold = trace_identity(student=TwoStep(), teachers=[TwoStep()], teacher_settings={}, settings={},
                               metric=None, metric_threshold=0.5)
    assert trace_id(threshold) != trace_id(no_metric)
    # A 3.x-style student names its target through its LM: another target keeps the traces.
    student = TwoStep()
    student.set_lm(dspy.LM("openai/local:models/other-target"))
    retargeted = trace_identity(student=student, teachers=[TwoStep()], teacher_settings={}, settings={},
                                metric=None, metric_threshold=None)
    assert trace_id(retargeted) == trace_id(no_metric)
    assert stable_identity(dspy.ChatAdapter()) != stable_identity(dspy.JSONAdapter())
    assert stable_identity(Glossary(["a"])) != stable_identity(Glossary(["b"]))


def test_store_keeps_results_by_example_skips_failures_and_a_cut_line(tmp_path):
    store = TraceStore(tmp_path / "store")
    a, b, c = two_step_examples(3)
    ok = {"calls": [{"example_index": 0, "split": "train", "predictor": "rewrite"}], "kept": True}
    with store.appender() as out:
        out.add(example_key(a), 0, ok)
        out.add(example_key(b), 0, {"failure": {"example_index": 1, "error_type": "RuntimeError"}})
    with open(out.path, "a") as f:
        f.write('{"example": "cut sho')  # this writer crashed mid-line
    with store.appender() as later:  # the next writer starts a file of its own: nothing glued to the cut line
        later.add(example_key(c), 0, ok)
    assert later.path != out.path and later.path.read_text().count("\n") == 1
    loaded = store.load()
    assert set(loaded) == {(example_key(a), 0), (example_key(c), 0)}  # the failure is tried again
    assert restamp(loaded[(example_key(c), 0)], 7, "val")["calls"][0] == {"example_index": 7, "split": "val",
                                                                           "predictor": "rewrite"}


def test_a_writer_killed_mid_line_loses_only_that_line(tmp_path):
    store = TraceStore(tmp_path / "store")
    examples = two_step_examples(4)
    result = {"calls": [{"example_index": 0, "split": "train", "predictor": "rewrite", "text": "x" * 100_000}],
              "kept": True}  # lines longer than any read chunk
    with store.appender() as out:
        for ex in examples[:3]:
            out.add(example_key(ex), 0, result)
    size = out.path.stat().st_size
    os.truncate(out.path, size - 70_000)  # the third line is cut short, as by a kill mid-write
    with store.appender() as later:  # the next writer never appends to the crashed one's file
        later.add(example_key(examples[3]), 0, result)
    assert later.path != out.path and len(read_jsonl(later.path)) == 1  # strict: whole JSON lines only
    assert set(store.load()) == {(example_key(e), 0) for e in (examples[0], examples[1], examples[3])}


def test_example_keys_and_changes():
    old = [example_key(e) for e in two_step_examples(5)]
    new = [example_key(e) for e in two_step_examples(4) + two_step_examples(3, offset=50)]
    assert example_changes(old, new) == "3 new, 1 removed example(s)"
    assert example_changes(old, old) is None
    assert example_key(two_step_examples(1)[0]) == example_key(two_step_examples(1)[0])


def test_store_and_sibling_locations(tmp_path):
    store = TraceStore.at(str(tmp_path), "TwoStep", {"x": 1})
    assert store.root.parent == tmp_path / "traces" and store.root.name.startswith("TwoStep-")
    assert json.loads((store.root / "identity.json").read_text()) == {"trace_id": trace_id({"x": 1}),
                                                                       "parts": {"x": fingerprint(1)}}
    assert RunDir(tmp_path / "A-1").sibling("A-2").root == tmp_path / "A-2"
    remote = RunDir.from_location("s3://b/runs/A-1?endpoint_override=127.0.0.1:9000").sibling("A-2")
    assert remote.remote == "s3://b/runs/A-2?endpoint_override=127.0.0.1:9000"


def test_run_name_traces_is_refused():
    with pytest.raises(ConfigError, match="run_name='traces'"):
        Config.from_options(run_name="traces")


def test_retrain_refuses_options_that_change_traces_or_data_before_any_work(tmp_path):
    from bootfinetune.entrypoints.retrain import retrain

    run = RunDir(tmp_path / "TwoStep-abc")
    config = Config.from_options(target="some/model")
    (run.data_dir).mkdir(parents=True)
    run.data_file("all").write_text("")
    (run.config_json).write_text(json.dumps({"options": config.to_dict(), "model_keys": {
        "all": {"target": "some/model", "predictors": ["rewrite"]}}}))
    with pytest.raises(ConfigError, match=r"metric_threshold=0.5: a bootstrap option \(the run has None\)"):
        retrain(str(run.root), metric_threshold=0.5)
    with pytest.raises(ConfigError, match="older bootfinetune"):  # no recorded inputs: no sibling name to give
        retrain(str(run.root), lr=1e-3)
    with pytest.raises(ConfigError, match="lrr"):
        retrain(str(run.root), lrr=1e-3)
    with pytest.raises(ConfigError, match="no config.json or data/"):
        retrain(str(tmp_path / "nothing-here"), lr=1e-3)


def close_enough(example, prediction, trace=None, tolerance=0.0):
    return abs(len(prediction.answer) - len(example.answer)) <= tolerance


class LengthMetric:
    """A callable metric object whose setting lives in an attribute."""

    def __init__(self, tolerance):
        self.tolerance = tolerance

    def __call__(self, example, prediction, trace=None):
        return close_enough(example, prediction, trace, self.tolerance)


def test_metrics_with_other_bound_settings_have_other_identities():
    """functools.partial and callable objects: the bound values are part of what keeps a trace."""
    def ident(metric):
        return trace_id(trace_identity(student=TwoStep(), teachers=[TwoStep()], teacher_settings={}, settings={},
                                       metric=metric, metric_threshold=None))

    assert ident(functools.partial(close_enough, tolerance=0)) != ident(functools.partial(close_enough, tolerance=3))
    assert ident(functools.partial(close_enough, tolerance=3)) == ident(functools.partial(close_enough, tolerance=3))
    assert ident(LengthMetric(0)) != ident(LengthMetric(3))
    assert ident(two_step_metric) == ident(two_step_metric)
