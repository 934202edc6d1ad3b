"""`bootfinetune compile`, `retrain` and `evaluate` are the Ray jobs' own arguments and functions, and a
bad job stops with every problem named before Ray starts."""

import argparse
import sys

import pytest

from bootfinetune.entrypoints import jobs
from bootfinetune.entrypoints.cli import JOB_COMMANDS, build_parser, main


def arguments(parser: argparse.ArgumentParser) -> list[tuple]:
    return [(tuple(a.option_strings), a.dest, a.default, a.required, a.help) for a in parser._actions
            if not isinstance(a, argparse._HelpAction)]


def subcommand(name: str) -> argparse.ArgumentParser:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


@pytest.mark.parametrize("command,job", [("compile", "compile"), ("retrain", "finetune"), ("evaluate", "evaluate")])
def test_a_subcommand_is_its_job_scripts_arguments_and_function(command, job):
    assert arguments(subcommand(command)) == arguments(jobs.job_parser(job))
    assert JOB_COMMANDS[command] == (job, getattr(jobs, f"run_{job}"))
    assert getattr(jobs, f"main_{job}").__doc__ == f"`ray_jobs/{job}.py`."  # the scripts' function: parse, run
    args = build_parser().parse_args([command, "--config", "c.yaml", "--set", "epochs=3", "--set", "lr=1e-4"]
                                     + (["--run-dir", "R"] if command != "compile" else []))
    assert (args.config, args.set) == ("c.yaml", ["epochs=3", "lr=1e-4"])


def test_a_missing_config_or_run_dir_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compile"])
    assert exit_.value.code == 2 and "--config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--config", "c.yaml"])
    assert "--run-dir" in capsys.readouterr().err


def test_a_bad_job_stops_before_ray_naming_every_problem(tmp_path, monkeypatch, capsys):
    """A program module in the current folder resolves (as under `ray job submit --working-dir .`); an unset
    key variable and a YAML typo each stop the command with exit code 2, and Ray is never joined."""
    (tmp_path / "my_task.py").write_text("import dspy\n\n\nclass Route(dspy.Module):\n    pass\n\n\n"
                                         "def metric(example, prediction, trace=None):\n    return True\n")
    (tmp_path / "job.yaml").write_text("program: my_task:Route\nmetric: my_task:metric\n"
                                       "trainset: {path: train.jsonl, inputs: [ticket]}\n"
                                       "teacher: {model: openai/gpt-4o-mini, api_key_env: BFT_CLI_TEST_KEY}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_task", raising=False)
    monkeypatch.delenv("BFT_CLI_TEST_KEY", raising=False)

    def no_ray(*_):
        raise AssertionError("joined Ray before the job's problems were reported")

    monkeypatch.setattr(jobs, "_connect", no_ray)
    assert main(["compile", "--config", "job.yaml"]) == 2
    err = capsys.readouterr().err
    assert "BFT_CLI_TEST_KEY is not set" in err and "does not resolve" not in err
    assert main(["compile", "--config", "job.yaml", "--set", "epoch=3", "--set", "zero_stage=5"]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()  # one `error:` line per problem
    assert len(lines) == 2 and all(line.startswith("error: job.yaml: ") for line in lines)
    assert "Did you mean 'epochs'?" in lines[0] and "zero_stage=5" in lines[1]
    assert main(["compile", "--config", "nope.yaml"]) == 2
    assert "--config nope.yaml: no such file" in capsys.readouterr().err
