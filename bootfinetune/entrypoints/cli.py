"""The `bootfinetune` command.

    bootfinetune demo                                  # the whole compile on a shipped task, offline
    bootfinetune compile --config job.yaml --set epochs=2   # your program, from a job YAML
    bootfinetune retrain --run-dir RUN_DIR --set lr=1e-4    # a run's traces trained again, no teacher call
    bootfinetune evaluate --run-dir RUN_DIR --config job.yaml --name heldout
    bootfinetune serve RUN_DIR --replicas 2            # a run's models on an OpenAI-compatible endpoint
    bootfinetune bootstrap --program my_pkg.rag:RAG --trainset train.jsonl --inputs question \\
        --teacher-model openai/gpt-4o-mini --api-key-env OPENAI_API_KEY --metric my_pkg.rag:exact_match
    bootfinetune teacher-server --script my_pkg.scripts:answer --port 8765

compile, retrain and evaluate are the Ray jobs of ray_jobs/ (compile.py, finetune.py, evaluate.py)
run from here: the same YAML, the same --set, the same BOOTFINETUNE_RESULT line. Import paths in
the YAML are found from the current folder first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from typing import Any

from bootfinetune.common.importpath import resolve
from bootfinetune.entrypoints import demo
from bootfinetune.entrypoints.flags import add_config_arguments, config_arguments
from bootfinetune.entrypoints.jobconfig import IMPORT_PATH
from bootfinetune.entrypoints.jobs import JOB_HELP, add_job_arguments, run_compile, run_evaluate, run_finetune
from bootfinetune.entrypoints.teachers import DEFAULT_TEACHER_TIMEOUT, teacher_lm
from bootfinetune.errors import BootFinetuneError, ConfigError, ProblemsError
from bootfinetune.run.report_html import teacher_usage
from bootfinetune.run.rundir import RunDir
from bootfinetune.serving.limits import DEADLINE_S, MAX_BODY_BYTES
from bootfinetune.serving.auth import key_from


def import_object(path: str, flag: str) -> Any:
    """Imports `package.module:attr` (attr may be dotted), the current folder first on the path.

    Raises:
        ConfigError: naming `flag`, when `path` is not an import path or does not import.
    """
    if not IMPORT_PATH.match(path):
        raise ConfigError([f"{flag} {path!r}: not an import path; write it as package.module:attr "
                           f"(e.g. {flag} my_pkg.rag:RAG)."])
    current_folder_first()
    try:
        return resolve(path)
    except (ImportError, AttributeError) as e:
        raise ConfigError([f"{flag} {path!r} does not import here ({type(e).__name__}: {e}); run from the folder "
                           f"that holds the package, or install it."]) from None


def current_folder_first() -> None:
    """Puts the current folder first on `sys.path`, as `python script.py` would for the script's own folder."""
    cwd = os.getcwd()
    if not sys.path or sys.path[0] != cwd:
        sys.path.insert(0, cwd)


JOB_COMMANDS = {"compile": ("compile", run_compile), "retrain": ("finetune", run_finetune),
                "evaluate": ("evaluate", run_evaluate)}
"""Subcommands that run a Ray job's function in this process: command -> (job, its function)."""


def cmd_job(args) -> int:
    current_folder_first()  # the YAML's import paths name modules beside it, as under `ray job submit`
    return JOB_COMMANDS[args.command][1](args)


def load_examples(path: str, inputs: list[str], flag: str = "--trainset") -> list:
    """The examples of a JSONL file, one per line, `inputs` marked.

    Raises:
        ConfigError: naming `flag`, when the file is missing, a line is not a JSON object, or one lacks an input.
    """
    import dspy

    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise ConfigError([f"{flag} {path}: cannot be read ({e.strerror}); give the path of a JSONL file, one "
                           f"example's fields per line."]) from None
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not set(inputs) <= set(row):
            raise ConfigError([f"{flag} {path}, line {n}: not a JSON object holding the --inputs {inputs}; fix the "
                               f"line or the --inputs."])
        rows.append(row)
    return [dspy.Example(**row).with_inputs(*inputs) for row in rows]


def cmd_bootstrap(args) -> int:
    import dspy  # reason: the command's start-up must not load DSPy unless it compiles

    from bootfinetune.compiler import BootstrapFinetune  # reason: as above

    loaded, problems = {}, []  # every mistake in the arguments at once, before Ray starts
    for flag, load in (("--program", lambda: import_object(args.program, "--program")),
                       ("--metric", lambda: import_object(args.metric, "--metric") if args.metric else None),
                       ("--trainset", lambda: load_examples(args.trainset, args.inputs))):
        try:
            loaded[flag] = load()
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    program, metric, trainset = loaded["--program"], loaded["--metric"], loaded["--trainset"]
    student = program() if isinstance(program, type) else program
    started = time.time()
    teacher = teacher_lm(args.teacher_model, api_base=args.api_base, api_key_env=args.api_key_env,
                         default_key="unused", option="--api-key-env", timeout=args.teacher_timeout)
    tp = BootstrapFinetune(metric=metric, teacher_settings={"lm": teacher}, **config_arguments(args))
    with dspy.context():
        prepared = tp.prepare(student, trainset=trainset)
    s = prepared.bootstrap.summary
    print(f"run directory: {prepared.run.root}")
    print(f"bootstrap: {s.examples} examples, {s.kept} kept, {s.failed} failed, {s.teacher_calls} teacher calls, "
          f"{s.seconds:.1f}s{' (read back, teacher not called)' if prepared.bootstrap.resumed else ''}")
    print(f"  teacher tokens: {teacher_usage(asdict(s))}")
    for name in prepared.plan.predictors:
        print(f"  predictor {name}: {s.per_predictor.get(name, 0)} kept calls -> model key "
              f"{prepared.plan.key_of[name]}")
    for key, data in prepared.data.items():
        print(f"data/{key}.jsonl: {data.records} records ({data.duplicates_dropped} duplicates dropped)")
    print(f"done in {time.time() - started:.1f}s")
    return 0


def cmd_teacher_server(args) -> int:
    from bootfinetune.testing.teacher_server import TeacherServer  # reason: loads the servers and DSPy

    server = TeacherServer(import_object(args.script, "--script"), host=args.host, port=args.port,
                           latency=args.latency, api_key=key_from(args.api_key), insecure=args.insecure)
    print(f"scripted teacher at {server.url} (Ctrl-C to stop)", flush=True)
    server.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


def cmd_serve(args) -> int:
    from bootfinetune.serving.ray_serve import model_specs, serve_run  # reason: loads Ray Serve and DSPy

    key = key_from(args.api_key)
    url = serve_run(args.run_dir, host=args.host, port=args.port, replicas=args.replicas,
                    max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                    device=args.device, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                    ray_address=args.ray_address, max_tokens=getattr(args, "max_tokens", None),
                    max_tokens_ceiling=getattr(args, "max_tokens_ceiling", None),
                    request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                    trust_remote_code=args.trust_remote_code, api_key=key, insecure=args.insecure)
    run = RunDir.from_location(args.run_dir)
    for line in serve_banner(run.location, url, sorted(model_specs(run, trust_remote_code=args.trust_remote_code)),
                             keyed=key is not None):
        print(line, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


def serve_banner(location: str, url: str, names: list[str], keyed: bool) -> list[str]:
    """What `bootfinetune serve` prints: where (the run without URI credentials), and how to call it (never the key)."""
    key = "os.environ['BOOTFINETUNE_API_KEY']" if keyed else "'local'"
    return [f"serving {location} at {url}: models {names}{' (API key required)' if keyed else ''} (Ctrl-C to stop)",
            f"  dspy.LM('openai/{names[0]}', api_base='{url}', api_key={key})",
            f"  bootfinetune.load('{location}', serve_url='{url}'{', api_key=...' if keyed else ''})"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bootfinetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bootstrap", help="run the teacher over a trainset on Ray Data and write finetuning data")
    b.add_argument("--program", required=True, help="the student program, package.module:Class (or instance)")
    b.add_argument("--trainset", required=True, help="JSONL file, one example's fields per line")
    b.add_argument("--inputs", nargs="+", required=True, help="which example fields are inputs")
    b.add_argument("--teacher-model", required=True, help="LiteLLM model name, e.g. openai/gpt-4o-mini")
    b.add_argument("--api-base", default=None, help="the teacher's OpenAI-compatible base URL")
    b.add_argument("--api-key-env", default=None, help="name of the environment variable holding the API key")
    b.add_argument("--teacher-timeout", type=float, default=DEFAULT_TEACHER_TIMEOUT,
                   help="seconds each attempt of a teacher call may wait for its answer (default %(default)g)")
    b.add_argument("--metric", default=None, help="package.module:function(example, prediction, trace)")
    add_config_arguments(b.add_argument_group("bootfinetune options (the run's config.json; its name is derived "
                                              "from all but the resource options)"),
                         aliases={"storage_path": ("--storage",)})
    b.add_argument("--per-predictor", dest="multitask", action="store_false", default=argparse.SUPPRESS,
                   help="one model per predictor (--no-multitask)")
    b.set_defaults(func=cmd_bootstrap)

    d = sub.add_parser("demo", help="compile a shipped two-predictor program offline, end to end, and report",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(d)
    d.set_defaults(func=demo.run_demo)

    s = sub.add_parser("serve", help="serve a run's finetuned models over an OpenAI-compatible endpoint (Ray Serve)")
    s.add_argument("run_dir", help="a finished compile's run directory (folder or s3:// / gs:// URI)")
    s.add_argument("--host", default="127.0.0.1", help="where the HTTP proxy listens (0.0.0.0 exposes it)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--replicas", type=int, default=1, help="copies of the deployment")
    s.add_argument("--max-batch-size", type=int, default=8, help="most requests one generate answers")
    s.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    s.add_argument("--device", default=None, help="cpu, cuda...; default: CUDA when the replica has a GPU")
    s.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    s.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    s.add_argument("--ray-address", default=None, help="Ray cluster to serve on (default: a running local one)")
    s.add_argument("--trust-remote-code", default=None, action=argparse.BooleanOptionalAction,
                   help="let the models' own code run when they load (default: off; a run's config.json never "
                        "turns it on)")
    s.add_argument("--request-timeout", type=float, default=DEADLINE_S,
                   help="seconds a request may take, queueing included, before its 504 (generation stops)")
    s.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body (413 above)")
    add_key_arguments(s)
    add_config_arguments(s, ["max_tokens", "max_tokens_ceiling"])  # default: the run's config.json
    s.set_defaults(func=cmd_serve)

    add_job_commands(sub)

    t = sub.add_parser("teacher-server", help="serve a scripted teacher over an OpenAI-compatible endpoint")
    t.add_argument("--script", required=True, help="package.module:function(inputs, output_names) -> outputs")
    t.add_argument("--host", default="127.0.0.1", help="where it listens (0.0.0.0 exposes it)")
    t.add_argument("--port", type=int, default=8765, help="its port: the teacher's api_base is http://HOST:PORT/v1")
    t.add_argument("--latency", type=float, default=0.0, help="seconds each answer waits")
    add_key_arguments(t)
    t.set_defaults(func=cmd_teacher_server)
    return parser


def add_key_arguments(parser: argparse.ArgumentParser) -> None:
    """--api-key and --insecure, the access rule of every server (`bootfinetune.serving.auth`)."""
    parser.add_argument("--api-key", default=None, help="the key clients must send as 'Authorization: Bearer <key>' "
                        "(default: $BOOTFINETUNE_API_KEY, which keeps it out of the process list; none: no key)")
    parser.add_argument("--insecure", action="store_true",
                        help="serve on a --host other than loopback without an API key (refused otherwise)")


def add_job_commands(sub: Any) -> None:
    """`compile`, `retrain` and `evaluate`: the Ray jobs' arguments, as subcommands."""
    for command, (job, _) in JOB_COMMANDS.items():
        p = sub.add_parser(command, help=JOB_HELP[job][0].lower() + JOB_HELP[job][1:].rstrip("."), description=f"{JOB_HELP[job]} The same as "
                           f"ray_jobs/{job}.py, run in this process (it joins or starts Ray).")
        add_job_arguments(p, job)
        p.set_defaults(func=cmd_job)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.command != "demo" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ProblemsError as exc:  # the user's input: one line each, no traceback
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except BootFinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
