"""Teacher faults over real HTTP: 429, 500, dropped connections, timeouts and garbage from a teacher on 127.0.0.1.

Transient faults are retried (the LM's bounded retries with backoff) and the example is kept;
an example whose calls keep failing becomes a failure record; every trainset example ends in
exactly one place (a recorded trace, kept or rejected by the metric, or a failure record).
"""

from pathlib import Path

import dspy
import pytest

from bootfinetune.stages.bootstrap import run_bootstrap
from bootfinetune.config import BootstrapConfig
from bootfinetune.run.jsonio import read_json, read_jsonl
from bootfinetune.run.rundir import RunDir
from bootfinetune.testing.faults import FaultyTeacherServer
from tests.programs import TwoStep, two_step_examples, two_step_metric, two_step_script

pytestmark = pytest.mark.integration

# example index -> (fault, attempts it lasts; None = every attempt)
PLAN = {1: ("429", 1), 2: ("500", 1), 5: ("drop", 1), 7: ("timeout", 1), 6: ("500", None), 8: ("garbage", None)}


def faults(inputs, attempt):
    text = inputs.get("text", "")
    for index, (kind, lasts) in PLAN.items():
        if text.endswith(f"item {index}") or text.endswith(f"item {index}!"):
            if lasts is None or attempt <= lasts:
                return kind
    return None


def test_transient_faults_are_retried_and_lasting_ones_become_failure_records(ray_cluster, tmp_path):
    examples = two_step_examples(12)
    with FaultyTeacherServer(two_step_script, faults=faults, slow_seconds=4.0) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="sk-fault-test-key-42",
                          cache=False, num_retries=2, timeout=1.5)
        run = RunDir(tmp_path / "run")
        result = run_bootstrap(run, teachers=[TwoStep()], metric=two_step_metric, examples=examples,
                               config=BootstrapConfig(num_actors=2, num_threads=4, batch_size=4),
                               teacher_settings={"lm": teacher}, secrets=["sk-fault-test-key-42"])
        injected = dict(server.injected)
        attempts = dict(server.attempts)
    s = result.summary
    failed = {f.example_index: f for f in result.failures}
    assert set(failed) == {6, 8}, {i: (f.error_type, f.message[:80]) for i, f in failed.items()}
    assert "500" in failed[6].message or "InternalServerError" in failed[6].error_type
    assert failed[8].error_type == "AdapterParseError"
    # Bounded: the always-500 prompt was tried 1 + num_retries times, not forever.
    assert max(attempts.values()) == 3
    assert injected["429"] >= 1 and injected["drop"] >= 1 and injected["timeout"] >= 1 and injected["500"] >= 3
    # Every example in exactly one place; the counts add up.
    traced = {c.example_index for c in result.calls}
    assert traced.isdisjoint(failed) and traced | set(failed) == set(range(12))
    assert s.examples == 12 and s.kept + s.rejected + s.failed == 12 and s.failed == 2
    kept = {c.example_index for c in result.calls if c.kept}
    assert {1, 2, 5, 7} <= kept  # the transient faults cost nothing
    assert s.rejected == len({4, 9})  # "bad item" examples: wrong teacher answers the metric rejects
    # The same numbers on disk, and the key nowhere in what was written.
    assert read_json(run.bootstrap_dir / "train.summary.json")["failed"] == 2
    assert {r["example_index"] for r in read_jsonl(run.bootstrap_dir / "train.failures.jsonl")} == {6, 8}
    for path in run.root.rglob("*"):
        if path.is_file():
            assert "sk-fault-test-key-42" not in path.read_text(errors="replace"), path
    # Nor in any log of the Ray session (driver, actors, raylet, dashboard).
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    scanned = [p for p in logs.rglob("*") if p.is_file()]
    assert scanned
    for path in scanned:
        assert b"sk-fault-test-key-42" not in path.read_bytes(), path
