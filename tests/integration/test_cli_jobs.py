"""`bootfinetune compile` and `bootfinetune evaluate` on real parts: a program module of the user's own in
the folder the command runs in, the shipped demo job YAML with `--set` overrides, the scripted teacher
that YAML starts, the tiny student its `target` function builds, and the session's Ray cluster."""

import json
import re
import sys
from pathlib import Path

import pytest

from bootfinetune import load
from bootfinetune.demo.task import make_datasets
from bootfinetune.entrypoints.cli import main
from bootfinetune.run.jsonio import read_json

pytestmark = pytest.mark.integration

DEMO_CPU = "ray_jobs/configs/demo_cpu.yaml"
USER_MODULE = '''"""A user's own program module, beside the job YAML: a subclass of the demo's program."""
from bootfinetune.demo.task import ShippingRouter, metric  # noqa: F401


class Router(ShippingRouter):
    """The demo's two predictors, under the user's own name."""
'''


def result_line(out: str) -> dict:
    [line] = re.findall(r"^BOOTFINETUNE_RESULT (\{.*\})$", out, re.M)
    return json.loads(line)


def test_compile_then_evaluate_a_program_of_ones_own_from_the_command(
        ray_cluster, tmp_path, monkeypatch, capsys):
    repo = Path(__file__).resolve().parents[2]
    project = tmp_path / "project"
    project.mkdir()
    (project / "router_task.py").write_text(USER_MODULE)
    train, val = make_datasets(24, 8, seed=3)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        (project / name).write_text("".join(json.dumps({"message": e.message, "city": e.city, "country": e.country})
                                            + "\n" for e in rows))
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command puts the current folder first
    monkeypatch.delitem(sys.modules, "router_task", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where demo_student builds the student

    overrides = ["--set", "program=router_task:Router", "--set", "metric=router_task:metric",
                 "--set", "trainset={path: train.jsonl, inputs: [message], limit: 16}",
                 "--set", "valset={path: val.jsonl, inputs: [message]}",
                 "--set", "epochs=1", "--set", "num_actors=1", "--set", f"storage_path={tmp_path / 'runs'}"]
    assert main(["compile", "--config", str(repo / DEMO_CPU), *overrides]) == 0
    compiled = result_line(capsys.readouterr().out)
    run_dir = tmp_path / "runs" / compiled["run_dir"].rsplit("/", 1)[-1]
    assert compiled["job"] == "compile" and str(run_dir) == compiled["run_dir"]
    report = read_json(run_dir / "report.json")
    boot = report["stages"]["bootstrap"]
    assert (boot["examples"], boot["teacher_calls"]) == (16, 32)  # the dataset's limit; two predictors a ticket
    assert report["metric"]["examples"] == 8 and compiled["metric"]["after"] == report["metric"]["after"]
    config = read_json(run_dir / "config.json")
    assert config["program_class"] == "router_task:Router"
    assert (tmp_path / "cache" / "bootfinetune" / "demo-student" / "config.json").exists()  # the target function ran

    assert main(["evaluate", "--run-dir", str(run_dir), "--config", str(repo / DEMO_CPU), *overrides,
                 "--name", "heldout"]) == 0
    evaluated = result_line(capsys.readouterr().out)
    assert evaluated["job"] == "evaluate" and evaluated["examples"] == 8 and 0 <= evaluated["score"] <= 1
    assert read_json(run_dir / "evaluations" / "heldout.json")["score"] == evaluated["score"]
    assert read_json(run_dir / "report.json")["evaluations"] == {"heldout": "heldout.json"}
    program = load(str(run_dir))  # imports router_task:Router from the current folder
    assert type(program).__name__ == "Router" and [n for n, _ in program.named_predictors()] == ["extract", "locate"]
