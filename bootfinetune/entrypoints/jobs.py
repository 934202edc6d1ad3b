"""The jobs: compile, bootstrap, finetune and evaluate, behind `ray_jobs/*.py` and the `bootfinetune` command.

Each job is one function over parsed arguments (`run_compile`, ...), and `add_job_arguments` is the one
home of its arguments: `ray_jobs/{job}.py` parses them alone, `bootfinetune compile`, `retrain` (the
finetune job) and `evaluate` as subcommands. Each reads a job YAML (`bootfinetune.entrypoints.jobconfig`,
checked in full before any work), checks what the cluster must provide (the API key variable, the
bucket), joins the job's Ray cluster, runs, and prints one `BOOTFINETUNE_RESULT {...}` line. A bad
config exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

from bootfinetune.errors import BootFinetuneError, ConfigError, ProblemsError
from bootfinetune.common.importpath import resolve
from bootfinetune.common.redaction import redact_urls_in
from bootfinetune.entrypoints.jobconfig import (JobConfig, TeacherSpec, check_environment, dataset_problems,
                                                load_dataset, load_job_config, parse_job_config, resolve_target)
from bootfinetune.run.rundir import RunDir
from bootfinetune.entrypoints.jobconfig import parse_set_value
from bootfinetune.entrypoints.teachers import scripted_teacher_lm, teacher_lm
from bootfinetune.runtime.console import bars_off, interactive
from bootfinetune.runtime.ray_env import ensure_ray

log = logging.getLogger("bootfinetune")

__all__ = ["JobConfig", "TeacherSpec", "check_environment", "load_job_config", "parse_job_config",
           "add_job_arguments", "job_parser", "run_compile", "run_bootstrap", "run_finetune", "run_evaluate",
           "main_compile", "main_bootstrap", "main_finetune", "main_evaluate", "run_main"]


class Teacher:
    """The job's teacher LM, and the scripted server behind it when there is one (stopped by `close`)."""

    def __init__(self, spec: TeacherSpec | None):
        self.server = None
        self.lm = None
        if spec is None:
            return
        extra = {k: getattr(spec, k) for k in ("temperature", "max_tokens", "num_retries", "timeout")
                 if getattr(spec, k) is not None}
        if spec.scripted:
            from bootfinetune.testing.teacher_server import TeacherServer  # reason: loads the servers and DSPy

            # Bootstrap actors may run on other nodes: bind to this node's address when the cluster has several.
            host = "127.0.0.1" if _single_node() else _node_ip()
            # A port derived from the script's name: the teacher's address is part of the run's identity,
            # so the same config finds the same run directory in the next job (bootstrap, then compile).
            port = 30000 + int(hashlib.sha256(spec.scripted.encode()).hexdigest()[:8], 16) % 20000
            try:
                self.server = TeacherServer(resolve(spec.scripted), host=host, port=port).start()
            except OSError:  # taken: any free port (this run will not share a directory with others)
                self.server = TeacherServer(resolve(spec.scripted), host=host).start()
            self.lm = scripted_teacher_lm(self.server.url, **extra)
        else:
            self.lm = teacher_lm(spec.model, api_base=spec.api_base, api_key_env=spec.api_key_env,
                                 option="teacher.api_key_env", **extra)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def _single_node() -> bool:
    import ray

    return not ray.is_initialized() or len([n for n in ray.nodes() if n.get("Alive")]) <= 1


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _setup_logging() -> None:
    if not any(getattr(h, "_bootfinetune_job", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[bootfinetune] %(message)s"))
        handler._bootfinetune_job = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    if not interactive():  # a job's log: no redrawn bars, from the first model the config builds on
        bars_off()


JOB_HELP = {
    "compile": "Compile a DSPy program with bootfinetune (bootstrap, finetune, rebind, evaluate).",
    "bootstrap": "Run the teacher over the trainset (Ray Data) and write the finetuning data.",
    "finetune": "Finetune the models of a run from its saved data (no teacher calls).",
    "evaluate": "Score a compiled run on a valset (metric over Ray Data actors).",
}
"""What each job does, one line: its parser's description (`ray_jobs/{job}.py --help`, `bootfinetune --help`)."""


def add_job_arguments(p: argparse.ArgumentParser, job: str) -> None:
    """The arguments of one job, the same for `ray_jobs/{job}.py` and its `bootfinetune` subcommand."""
    if job in ("compile", "bootstrap"):
        p.add_argument("--config", required=True, help="the job YAML (see ray_jobs/configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key of the YAML (repeatable), e.g. --set epochs=3")
    elif job == "finetune":
        p.add_argument("--config", default=None, help="a job YAML whose training options to use (its program, data "
                                                      "and teacher are not used; bootstrap options must match the run)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a training, inference or resource option for this job (repeatable), e.g. --set lr=1e-4 "
                            "--set num_workers=4")
    elif job == "evaluate":
        p.add_argument("--config", required=True, help="a job YAML naming valset and metric (see ray_jobs/configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key of the YAML (repeatable), e.g. --set valset=...")
    else:
        raise ValueError(f"unknown job {job!r}; one of {', '.join(JOB_HELP)}")
    if job in ("finetune", "evaluate"):
        p.add_argument("--run-dir", required=True, help="the run's folder or URI (as the compile printed it)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, which a Ray job has, "
                                                       "else the cluster running on this machine, else a new one)")
    if job == "evaluate":
        p.add_argument("--name", default="eval", help="name of the evaluation in the run's evaluations/ folder")


def job_parser(job: str) -> argparse.ArgumentParser:
    """The parser of `ray_jobs/{job}.py`."""
    p = argparse.ArgumentParser(description=JOB_HELP[job])
    add_job_arguments(p, job)
    return p


def _connect(job: JobConfig | None, address: str | None) -> None:
    ensure_ray(address or (job.config.run.ray_address if job else None),
               log_to_driver=bool(job and job.config.run.verbose))  # workers' output: Ray's session logs


def _result(kind: str, **fields: Any) -> int:
    """Prints the job's one-line JSON result (what a CI script or a caller parses), returns 0."""
    line = json.dumps({"job": kind, **fields}, default=str)
    print("BOOTFINETUNE_RESULT " + redact_urls_in(line), flush=True)  # no URI credentials in CI logs
    return 0


@dataclass
class ReadyJob:
    """A compile or bootstrap job made ready to run: the optimizer, its config and the data."""

    teleprompter: Any
    """The `BootstrapFinetune` the YAML configures."""
    job: JobConfig
    trainset: list
    valset: list | None
    compile_args: dict[str, Any]
    """compile()'s documented arguments the YAML gives (e.g. target)."""


@contextlib.contextmanager
def _ready_job(args: argparse.Namespace) -> Iterator[ReadyJob]:
    """Checks the config and the environment, connects, loads the data, starts the teacher; yields the job
    ready to run and stops the teacher after."""
    _setup_logging()
    job = load_job_config(args.config, args.set)
    check_environment(job)  # before Ray starts: a missing file, key variable or bucket is the user's to fix
    _connect(job, args.ray_address)
    from bootfinetune.compiler import BootstrapFinetune  # reason: loads DSPy; the command starts without it

    trainset, valset = load_dataset(job.trainset), (load_dataset(job.valset) if job.valset else None)
    teacher = Teacher(job.teacher)
    try:
        options, train_args = _split_options(job)
        tp = BootstrapFinetune(metric=resolve(job.metric) if job.metric else None,
                               teacher_settings={"lm": teacher.lm} if teacher.lm else {}, **options)
        yield ReadyJob(tp, job, trainset, valset, train_args)
    finally:
        teacher.close()


def run_compile(args: argparse.Namespace) -> int:
    """The compile job (`ray_jobs/compile.py`, `bootfinetune compile`): a YAML config -> a compiled program
    and its run directory."""
    started = time.time()
    with _ready_job(args) as ready:
        tp = ready.teleprompter
        tp.compile(_program(ready.job), trainset=ready.trainset, valset=ready.valset, **ready.compile_args)
    return _result("compile", run_dir=tp.run_dir.location, metric=tp.report.get("metric"),
                   seconds=round(time.time() - started, 1))


def run_bootstrap(args: argparse.Namespace) -> int:
    """The bootstrap job (`ray_jobs/bootstrap.py`): checks, bootstrapping and the data stage only."""
    with _ready_job(args) as ready:
        prepared = ready.teleprompter.prepare(_program(ready.job), trainset=ready.trainset, valset=ready.valset,
                                              **ready.compile_args)
    s = prepared.bootstrap.summary
    return _result("bootstrap", run_dir=prepared.run.location, kept=s.kept, examples=s.examples, failed=s.failed,
                   records={k: d.records for k, d in prepared.data.items()})


def run_finetune(args: argparse.Namespace) -> int:
    """The finetune job (`ray_jobs/finetune.py`, `bootfinetune retrain`): trains a run's models from the data a
    bootstrap saved, then writes program.json.

    `--set lr=1e-4` (any training or inference option) trains the same traces with new options
    into a new run directory beside the old one (`bootfinetune.entrypoints.retrain`); resource options
    (cpus_per_worker, gpus_per_worker, max_failures, ...) only change where the run's own training
    happens (num_workers changes the global batch: a new run).
    """
    _setup_logging()
    from bootfinetune.pipeline import finetune_and_rebind  # reason: loads DSPy; the command starts without it
    from bootfinetune.entrypoints.retrain import prepare_retrain  # reason: as above

    options = {}
    if args.config:
        options.update(load_job_config(args.config, [], need=()).options)
        if "target" in options:
            options["target"] = resolve_target(options["target"])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError([f"--set {item}: write KEY=VALUE, e.g. --set lr=1e-4."])
        options[key] = parse_set_value(value)
    ready = prepare_retrain(args.run_dir, **options)
    with ready.writer:  # held since prepare_retrain: one writer per run
        trained = finetune_and_rebind(ready.run, ready.config, ready.description, ready.jobs, to_stage="rebind",
                             ray_address=args.ray_address)
    run = ready.run
    return _result("finetune", run_dir=run.location, models={k: str(run.model_dir(k)) for k in trained.manifests},
                   best_epoch={k: m.best_epoch for k, m in trained.manifests.items()}, program=trained.program_note,
                   from_run=args.run_dir)


def run_evaluate(args: argparse.Namespace) -> int:
    """The evaluate job (`ray_jobs/evaluate.py`, `bootfinetune evaluate`): scores a finished run's compiled
    program on the config's valset, over Ray, into the run's `evaluations/{name}.json`."""
    _setup_logging()
    from bootfinetune.pipeline import evaluate_run  # reason: loads DSPy; the command starts without it

    job = load_job_config(args.config, args.set, need=("valset", "metric"))
    problems = dataset_problems(job, ("valset",))
    run = RunDir.from_location(args.run_dir)
    if run.remote is None and not run.program_json.exists():
        problems.append(f"--run-dir {args.run_dir}: no program.json there; pass the run directory a finished "
                        f"compile printed (its folder or s3:// / gs:// URI).")
    if problems:  # before Ray starts
        raise ConfigError(problems)
    _connect(job, args.ray_address)
    valset = load_dataset(job.valset)
    b = job.config.bootstrap
    out = evaluate_run(args.run_dir, valset, resolve(job.metric), name=args.name, num_threads=job.config.inference.eval_threads,
                       num_actors=b.num_actors, about={"valset": job.valset, "metric": job.metric},
                       writer_wait_s=job.config.run.writer_wait_s)
    log.info("evaluate: %s on %d examples", out["score"], len(valset))
    return _result("evaluate", run_dir=RunDir.from_location(args.run_dir).location, **out)


def main_compile(argv: list[str] | None = None) -> int:
    """`ray_jobs/compile.py`."""
    return run_compile(job_parser("compile").parse_args(argv))


def main_bootstrap(argv: list[str] | None = None) -> int:
    """`ray_jobs/bootstrap.py`."""
    return run_bootstrap(job_parser("bootstrap").parse_args(argv))


def main_finetune(argv: list[str] | None = None) -> int:
    """`ray_jobs/finetune.py`."""
    return run_finetune(job_parser("finetune").parse_args(argv))


def main_evaluate(argv: list[str] | None = None) -> int:
    """`ray_jobs/evaluate.py`."""
    return run_evaluate(job_parser("evaluate").parse_args(argv))


def _split_options(job: JobConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor options, compile()'s documented arguments), the target resolved when it is an import path."""
    from bootfinetune.compiler import COMPILE_OPTION_ARGS  # reason: loads DSPy; the command starts without it

    options = dict(job.options)
    args = {k: options.pop(k) for k in COMPILE_OPTION_ARGS if k in options}
    if "target" in args:
        args["target"] = resolve_target(args["target"])
    return options, args


def _program(job: JobConfig) -> Any:
    obj = resolve(job.program)
    return obj()


def run_main(fn: Any) -> None:
    """Runs an entrypoint without a traceback for what the user must fix.

    A ConfigError or ProgramError prints one `error:` line per problem and exits 2 (nothing ran); any
    other error of ours (a run busy, a bootstrap or finetune that failed) prints its message and exits 1.
    """
    try:
        sys.exit(fn())
    except ProblemsError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    except BootFinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
