"""`bootfinetune demo`: the whole compile, offline, on a local Ray cluster.

What it does, in order:

1. builds the task (`bootfinetune.demo.task`): a two-predictor DSPy program that routes
   shipping tickets, and a synthetic trainset and valset from a seeded generator;
2. starts the scripted teacher, an OpenAI-compatible endpoint on 127.0.0.1 that stands in
   for a large model (it is a Python function, not a model; see `teacher_script`), unless
   `--teacher` names a real LM;
3. builds the student, a small Llama-style model with its own tokenizer, from a config with
   random weights (cached, so later runs reuse it), unless `--target` names one;
4. runs `BootstrapFinetune(...).compile(...)`: bootstrapping on Ray Data, finetuning with
   Ray Train and DeepSpeed, rebinding, and the metric on the valset before and after;
5. prints a summary table and the paths of report.json and report.html.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bootfinetune.config import FIELDS, TrainConfig
from bootfinetune.demo.cache import default_cache_dir
from bootfinetune.entrypoints.flags import add_config_arguments, config_arguments
from bootfinetune.entrypoints.teachers import DEFAULT_TEACHER_TIMEOUT, scripted_teacher_lm, teacher_lm
from bootfinetune.errors import ConfigError
from bootfinetune.run.report_html import student_usage, teacher_usage
from bootfinetune.runtime.ray_env import ensure_ray

OVERRIDES = dict(epochs=10, bsize=8, lr=2e-3, adam_beta2=0.95, weight_decay=0.1, warmup_ratio=0.05, max_length=96,
                 max_tokens=24)
"""The demo's own option values (flags override them; every other option keeps `Config`'s default): a model
trained from scratch, so a far higher lr than a finetune's. max_length=96 keeps the last 96 tokens of each
prompt and answer, dropping the instructions DSPy's ChatAdapter opens every prompt with (the report counts the
cut prompts; inference cuts them the same way)."""



def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(a) for a, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (max(len(b) for _, b in rows) + 2) + "+"
    out = [line]
    for a, b in rows:
        out.append(f"| {a.ljust(width)} | {b.ljust(len(line) - width - 6)} |")
    out.append(line)
    return "\n".join(out)


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def summary_rows(report: dict, elapsed: float) -> list[tuple[str, str]]:
    stages = report.get("stages", {})
    boot, metric = stages.get("bootstrap", {}), report.get("metric", {})
    finetune = {k: v for k, v in stages.get("finetune", {}).items() if isinstance(v, dict)}
    val = boot.get("val") or {}
    rows = [("trainset examples kept", f"{boot.get('kept')} of {boot.get('examples')} "
                                       f"({boot.get('failed')} failed, {boot.get('teacher_calls')} teacher calls)"),
            ("teacher tokens", teacher_usage(boot)),
            ("student tokens (scoring)", student_usage(stages.get("evaluate", {}))),
            ("valset examples", f"{val.get('examples', 0)}"),
            ("models trained", ", ".join(f"{k} ({len(v.get('train_loss') or [])} epochs, best {v.get('best_epoch')})"
                                         for k, v in finetune.items()) or "none"),
            ("metric before (base student)", _fmt(metric.get("before"))),
            ("metric after (finetuned)", _fmt(metric.get("after"))),
            ("metric teacher", _fmt(metric.get("teacher")))]
    for name in ("bootstrap", "data", "finetune", "evaluate"):
        seconds = stages.get(name, {}).get("seconds")
        if name == "bootstrap" and val.get("seconds"):
            seconds = (seconds or 0) + val["seconds"]
        rows.append((f"time: {name}", f"{_fmt(seconds, 1)} s"))
    rows.append(("time: whole demo", f"{elapsed:.1f} s"))
    return rows


def run_demo(args: argparse.Namespace) -> int:
    """Runs the demo (see the module docstring); returns the exit code."""
    log = logging.getLogger("bootfinetune")
    saved = (log.level, log.propagate)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[bootfinetune] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return _run(args)
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _run(args: argparse.Namespace) -> int:
    started = time.time()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # reason (the imports below, and those in the steps): the `bootfinetune` command starts without DSPy, torch
    # or the servers
    import transformers

    from bootfinetune.compiler import BootstrapFinetune
    from bootfinetune.demo.task import ShippingRouter, make_datasets, metric

    transformers.utils.logging.disable_progress_bar()  # weight loading bars would bury the stage lines

    def say(message: str) -> None:
        print(f"[demo {time.time() - started:6.1f}s] {message}", flush=True)

    options = {**OVERRIDES, **config_arguments(args)}
    target = options.pop("target", None)  # the demo's own --target: None builds the tiny student
    trainset, valset = make_datasets(args.train_size, args.val_size, seed=options.get("seed", TrainConfig.seed))
    say(f"task: ShippingRouter (extract -> locate), {len(trainset)} train / {len(valset)} val tickets")
    target = _student(args, target, trainset, say)
    try:
        teacher, server = _teacher(args, say)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _start_ray(options)
    try:
        tp = BootstrapFinetune(metric=metric, teacher_settings=dict(lm=teacher), **options)
        compiled = tp.compile(ShippingRouter(), trainset=trainset, valset=valset, target=target)
    finally:
        if server is not None:
            server.stop()
    _show_held_out(compiled, valset[0], say)
    _print_summary(tp, time.time() - started)
    return 0


def _student(args: argparse.Namespace, target: str | None, trainset: list, say: Callable[[str], None]) -> str:
    """The model to finetune: `--target`, else the tiny student built (or reused) in `--cache-dir`."""
    if target:
        say(f"student: {target}")
        return target
    from bootfinetune.demo.run import build_student  # reason: as in `_run`

    student_dir, reused = build_student(Path(args.cache_dir), trainset)
    say(f"student: {'reused' if reused else 'built'} {student_dir} (tiny Llama, random weights, own tokenizer)")
    return str(student_dir)


def _teacher(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[Any, Any]:
    """(the teacher LM, the scripted teacher's server or None): `--teacher`, else the scripted stand-in, started."""
    if args.teacher:
        teacher = teacher_lm(args.teacher, api_base=args.api_base, api_key_env=args.api_key_env,
                             option="--api-key-env", timeout=args.teacher_timeout)
        say(f"teacher: {args.teacher}{' at ' + args.api_base if args.api_base else ''}")
        return teacher, None
    from bootfinetune.demo.task import teacher_script  # reason: as in `_run`
    from bootfinetune.testing.teacher_server import TeacherServer

    server = TeacherServer(teacher_script, latency=args.teacher_latency).start()
    say(f"teacher: scripted stand-in for a large model at {server.url} (an OpenAI-compatible endpoint)")
    return scripted_teacher_lm(server.url), server


def _start_ray(options: dict[str, Any]) -> None:
    """Connects to (or starts) Ray; on CPUs, the training workers share this machine's CPUs (`cpus_per_worker`)."""
    import ray  # reason: as in `_run`

    # Worker logs stay in the Ray session logs unless --verbose: the stage lines and progress say what happens.
    ensure_ray(options.get("ray_address"), num_cpus=max(2, os.cpu_count() or 2),  # its line is logged
               log_to_driver=bool(options.get("verbose")))
    cpus = int(ray.cluster_resources().get("CPU", 2))
    if not options.get("use_gpu"):
        options.setdefault("cpus_per_worker", max(1, cpus // options.get("num_workers", TrainConfig.num_workers)))


def _show_held_out(compiled: Any, example: Any, say: Callable[[str], None]) -> None:
    """The compiled program's answer to one valset ticket (an error is shown, not raised)."""
    try:
        prediction = compiled(message=example.message)
        say(f"compiled program on a held-out ticket: {example.message!r} -> city={prediction.city!r}, "
            f"country={prediction.country!r} (expected {example.country!r})")
    except Exception as exc:  # an unparsable answer from a weak model is worth seeing, not a crash
        say(f"compiled program on a held-out ticket raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def _print_summary(tp: Any, elapsed: float) -> None:
    print()
    print(_table(summary_rows(tp.report, elapsed)))
    print()
    print(f"report.json: {tp.run_dir.report_json}")
    print(f"report.html: {tp.run_dir.root / 'report.html'}")
    print(f"run directory: {tp.run_dir.root}  (bootfinetune.load(run_dir) rebuilds the compiled program)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's own flags, then one per `Config` field (`--epochs`, `--zero-stage`, ...) at the demo's values.

    `--seed` seeds the task's datasets too; `--target` is the demo's own (default: the tiny student).
    """
    p.add_argument("--per-predictor", dest="multitask", action="store_false", default=argparse.SUPPRESS,
                   help="one model per predictor (--no-multitask)")
    p.add_argument("--train-size", type=int, default=500, help="training tickets the seeded generator makes")
    p.add_argument("--val-size", type=int, default=200, help="validation tickets, none of them in the trainset")
    p.add_argument("--teacher", default=None, help="a real teacher LM (LiteLLM name, e.g. openai/gpt-4o-mini)")
    p.add_argument("--api-base", default=None, help="the real teacher's OpenAI-compatible base URL")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the teacher's API key")
    p.add_argument("--teacher-timeout", type=float, default=DEFAULT_TEACHER_TIMEOUT,
                   help="seconds each attempt of a real teacher's call may wait (default %(default)g)")
    p.add_argument("--teacher-latency", type=float, default=0.02, help="seconds the scripted teacher waits per call")
    p.add_argument("--target", default=argparse.SUPPRESS,
                   help="finetune this model (directory or hub id) instead of the tiny one")
    p.add_argument("--cache-dir", default=str(default_cache_dir()), help="where the built student is kept")
    add_config_arguments(p.add_argument_group("bootfinetune options"), [n for n in FIELDS if n != "target"],
                         defaults=OVERRIDES, aliases={"storage_path": ("--storage",), "num_workers": ("--workers",),
                                                      "use_gpu": ("--gpus",)})
