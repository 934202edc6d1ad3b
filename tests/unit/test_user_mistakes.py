"""A user's mistake in the command line or a job config is one `error:` line naming the argument and the fix,
exit code 2, no traceback, and Ray never started: `ray.init` is replaced by one that records its calls (a check
made after connecting would call it; the suite's shared cluster may already be up, so `ray.is_initialized()`
cannot tell)."""

import json
import sys
from pathlib import Path

import pytest
import ray
import yaml

from bootfinetune.entrypoints import cli, jobs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def ray_inits(monkeypatch) -> list:
    """The calls to `ray.init` a test made (none is the point): each raises, as if no cluster could be reached."""
    calls: list = []

    def init(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("ray.init was called before the user's mistake was reported")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # so that a connection is asked for here too
    return calls


def errors_of(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


def bootstrap_args(tmp_path, **over) -> list[str]:
    args = {"--program": "tests.programs:TwoStep", "--trainset": str(tmp_path / "train.jsonl"),
            "--teacher-model": "openai/gpt-4o-mini", "--storage": str(tmp_path / "runs"), **over}
    return ["bootstrap", *[x for k, v in args.items() for x in (k, v)], "--inputs", "question"]


def test_cli_names_a_bad_program_and_a_missing_trainset_at_once_before_ray(tmp_path, capsys, ray_inits):
    code = cli.main(bootstrap_args(tmp_path, **{"--program": "my_pkg.nothing:RAG", "--metric": "tests.programs"}))
    lines = errors_of(capsys)
    assert code == 2 and len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert lines[0].startswith("error: --program 'my_pkg.nothing:RAG' does not import here (ModuleNotFoundError")
    assert lines[1].startswith("error: --metric 'tests.programs': not an import path; write it as package.module:attr")
    assert lines[2].startswith(f"error: --trainset {tmp_path / 'train.jsonl'}: cannot be read (No such file")
    assert not ray_inits and not (tmp_path / "runs").exists()


def test_cli_names_a_trainset_line_without_the_inputs(tmp_path, capsys, ray_inits):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n{oops\n")
    code = cli.main(bootstrap_args(tmp_path))
    assert code == 2 and errors_of(capsys) == [
        f"error: --trainset {tmp_path / 'train.jsonl'}, line 2: not a JSON object holding the --inputs ['question']; "
        f"fix the line or the --inputs."]
    assert not ray_inits


def job_config(tmp_path, **over) -> str:
    config = {"program": "tests.programs:TwoStep", "metric": "tests.programs:two_step_metric",
              "trainset": {"path": str(tmp_path / "missing.jsonl"), "inputs": ["question"]},
              "teacher": {"scripted": "tests.programs:two_step_script"}, "storage_path": str(tmp_path / "runs"),
              **over}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "job.yaml")


@pytest.mark.parametrize("main", [jobs.main_compile, jobs.main_bootstrap], ids=["compile", "bootstrap"])
def test_a_job_with_a_missing_dataset_file_stops_before_ray(tmp_path, capsys, main, ray_inits):
    with pytest.raises(SystemExit) as stop:
        jobs.run_main(lambda: main(["--config", job_config(tmp_path)]))
    lines = errors_of(capsys)
    assert stop.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: trainset.path: {tmp_path / 'missing.jsonl'}: no such file; give the JSONL")
    assert not ray_inits and not (tmp_path / "runs").exists()


def test_the_evaluate_job_names_a_missing_valset_and_run_dir_before_ray(tmp_path, capsys, ray_inits):
    config = job_config(tmp_path, valset={"path": "nowhere/val.jsonl", "inputs": ["question"]})
    with pytest.raises(SystemExit) as stop:
        jobs.run_main(lambda: jobs.main_evaluate(["--config", config, "--run-dir", str(tmp_path / "no-run")]))
    lines = errors_of(capsys)
    assert stop.value.code == 2 and len(lines) == 2
    assert lines[0].startswith("error: valset.path: nowhere/val.jsonl: no such file")
    assert lines[1].startswith(f"error: --run-dir {tmp_path / 'no-run'}: no program.json there")
    assert not ray_inits


def test_the_job_scripts_print_one_line_per_mistake(tmp_path):
    """The script itself, as `ray job submit` runs it: a bad program path in the YAML, nothing else."""
    import subprocess

    config = job_config(tmp_path, program="my_pkg.nothing:RAG")
    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "compile.py"), "--config", config],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: program='my_pkg.nothing:RAG' does not resolve")
