"""Ray job entrypoints' shared logic: a YAML job config, checked before any work, and the four jobs.

A job config is one flat YAML mapping. Its keys are the job's own (`program`, `trainset`,
`valset`, `metric`, `teacher`) and any field of `bootfinetune.Config` (`target`, `epochs`,
`storage_path`, `zero_stage`, ...), checked by the same code as `compile(**options)`:

```yaml
program: bootfinetune.demo.task:ShippingRouter     # package.module:attr, called with no arguments
metric: bootfinetune.demo.task:metric
trainset: bootfinetune.demo.task:demo_trainset     # a list, a callable returning one, or a JSONL file:
valset: {path: s3://bucket/val.jsonl, inputs: [message]}
teacher: {model: openai/gpt-4o-mini, api_key_env: OPENAI_API_KEY}   # the key's *name*, never the key
target: Qwen/Qwen2.5-0.5B-Instruct
epochs: 2
storage_path: s3://bucket/bootfinetune-runs
```

`load_job_config` reports every problem at once (unknown keys with the closest known one,
bad values, import paths that do not resolve, an `api_key` written in the file); the
environment (the named API key variable set, the bucket writable) is checked when the job
starts, before the first teacher call.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bootfinetune.config import FIELD_OWNER, Config
from bootfinetune.errors import ConfigError, ProgramError

log = logging.getLogger("bootfinetune")

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
TEACHER_KEYS = {"model", "api_base", "api_key_env", "scripted", "temperature", "max_tokens", "num_retries"}
"""What a `teacher:` mapping may hold: a LiteLLM model name with its endpoint, or a scripted stand-in."""


@dataclass
class TeacherSpec:
    """The teacher LM: `model` (LiteLLM name) + `api_base` + `api_key_env`, or `scripted` (import path)."""

    model: str | None = None
    """LiteLLM model name, e.g. "openai/gpt-4o-mini" or "openai/my-vllm-model"."""
    api_base: str | None = None
    """OpenAI-compatible base URL (vLLM, a gateway); None for the provider's own."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (set on the cluster, never in the file)."""
    scripted: str | None = None
    """Import path of a `script(inputs, outputs) -> dict` served by a TeacherServer (demos, tests)."""
    temperature: float | None = None
    max_tokens: int | None = None
    num_retries: int | None = None


@dataclass
class JobConfig:
    """A job's configuration: what to compile (import paths, data) and the compile's `Config`."""

    program: str | None = None
    """Import path `package.module:attr` of the program class (or factory), called with no arguments."""
    trainset: Any = None
    """Import path of a list of dspy.Example (or a callable returning one), or {path, inputs} of a JSONL file."""
    valset: Any = None
    """Same forms as trainset; held out for eval loss and the metric before / after."""
    metric: str | None = None
    """Import path of `metric(example, prediction, trace=None)`."""
    teacher: TeacherSpec | None = None
    """The teacher LM; None uses the program's own LMs."""
    options: dict[str, Any] = field(default_factory=dict)
    """Every `Config` field the file sets (target, epochs, storage_path, ...)."""
    source: str | None = None
    """The file it was read from."""

    @property
    def config(self) -> Config:
        return Config.from_options(**self.options)


JOB_KEYS = {f.name for f in dataclasses.fields(JobConfig)} - {"options", "source"}


def load_job_config(path: str | os.PathLike, overrides: list[str] | None = None, *,
                    need: tuple[str, ...] = ("program", "trainset")) -> JobConfig:
    """Reads and checks a job YAML; raises one ConfigError listing every problem (file and key named).

    Args:
        path: The YAML file.
        overrides: `key=value` strings (YAML values) applied over the file, e.g. ["epochs=3"].
        need: Job keys this job cannot run without.
    """
    import yaml

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError([f"--config {where}: no such file; pass the path of a job YAML (see ray_jobs/configs/)."])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{where}: not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{where}: the file must be a mapping of option: value, not {type(raw).__name__}."])
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--set {item!r}: write key=value, e.g. --set epochs=3."])
        raw[key.strip()] = yaml.safe_load(value)
    return parse_job_config(raw, where, need=need)


def parse_job_config(raw: dict[str, Any], where: str = "job config", *,
                     need: tuple[str, ...] = ("program", "trainset")) -> JobConfig:
    """Checks a job mapping (see `load_job_config`)."""
    problems: list[str] = []
    options = {k: v for k, v in raw.items() if k in FIELD_OWNER}
    for key in raw:
        if key == "api_key":
            problems.append(f"{where}: api_key must not be written in a config file; put the key in an environment "
                            f"variable on the cluster and name it: teacher: {{api_key_env: OPENAI_API_KEY}}.")
        elif key not in JOB_KEYS and key not in FIELD_OWNER:
            close = difflib.get_close_matches(key, sorted(JOB_KEYS | set(FIELD_OWNER)), n=1)
            problems.append(f"{where}: unknown key {key!r}." + (f" Did you mean {close[0]!r}?" if close else "")
                            + f" Job keys: {', '.join(sorted(JOB_KEYS))}; or any bootfinetune option.")
    for key in need:
        if raw.get(key) in (None, ""):
            problems.append(f"{where}: {key} is required for this job; e.g. {_EXAMPLES[key]}.")
    for key in ("program", "metric"):
        if raw.get(key) is not None:
            problems += _check_import(where, key, raw[key])
    for key in ("trainset", "valset"):
        if raw.get(key) is not None:
            problems += _check_dataset(where, key, raw[key])
    teacher = None
    if raw.get("teacher") is not None:
        teacher, teacher_problems = _parse_teacher(where, raw["teacher"])
        problems += teacher_problems
    target = options.get("target")
    if isinstance(target, str) and IMPORT_PATH.match(target):
        problems += _check_import(where, "target", target)
    try:
        Config.from_options(**options)
    except ConfigError as e:
        problems += [f"{where}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    return JobConfig(program=raw.get("program"), trainset=raw.get("trainset"), valset=raw.get("valset"),
                     metric=raw.get("metric"), teacher=teacher, options=options, source=where)


_EXAMPLES = {"program": "program: mypkg.pipeline:RAG", "trainset": "trainset: {path: data/train.jsonl, inputs: [question]}"}


def _check_import(where: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, str) or not IMPORT_PATH.match(value):
        return [f"{where}: {key}={value!r}: give an import path package.module:attr, e.g. mypkg.pipeline:RAG."]
    try:
        resolve(value)
    except Exception as e:  # the import error's own words help most
        return [f"{where}: {key}={value!r} does not resolve here ({type(e).__name__}: {e}); ship the module in the "
                f"job's working_dir or install it on the cluster image."]
    return []


def _check_dataset(where: str, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return _check_import(where, key, value)
    if isinstance(value, dict):
        extra = set(value) - {"path", "inputs", "limit"}
        problems = [f"{where}: {key}.{k}: unknown; a file dataset has path, inputs and optionally limit."
                    for k in sorted(extra)]
        if not isinstance(value.get("path"), str) or not value.get("path"):
            problems.append(f"{where}: {key}.path: give the JSONL file (a local path or s3://, gs:// URI).")
        inputs = value.get("inputs")
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            problems.append(f"{where}: {key}.inputs: list the input field names, e.g. inputs: [question].")
        if value.get("limit") is not None and (not isinstance(value["limit"], int) or value["limit"] < 1):
            problems.append(f"{where}: {key}.limit: a positive integer (use the first N rows).")
        return problems
    return [f"{where}: {key}: give an import path (package.module:attr) or {{path: file.jsonl, inputs: [field, ...]}}."]


def _parse_teacher(where: str, value: Any) -> tuple[TeacherSpec | None, list[str]]:
    if isinstance(value, str):
        value = {"model": value}
    if not isinstance(value, dict):
        return None, [f"{where}: teacher: a mapping such as {{model: openai/gpt-4o-mini, api_key_env: OPENAI_API_KEY}}."]
    problems = []
    if "api_key" in value:
        problems.append(f"{where}: teacher.api_key must not be written in a config file; set the key in an "
                        f"environment variable on the cluster and name it with teacher.api_key_env.")
    for key in sorted(set(value) - TEACHER_KEYS - {"api_key"}):
        close = difflib.get_close_matches(key, sorted(TEACHER_KEYS), n=1)
        problems.append(f"{where}: teacher.{key}: unknown." + (f" Did you mean {close[0]!r}?" if close else "")
                        + f" Known: {', '.join(sorted(TEACHER_KEYS))}.")
    if bool(value.get("model")) == bool(value.get("scripted")):
        problems.append(f"{where}: teacher: give exactly one of model (a LiteLLM name) or scripted (an import path).")
    if value.get("scripted"):
        problems += _check_import(where, "teacher.scripted", value["scripted"])
    env = value.get("api_key_env")
    if env is not None and (not isinstance(env, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", env)):
        problems.append(f"{where}: teacher.api_key_env={env!r}: the *name* of an environment variable, "
                        f"e.g. OPENAI_API_KEY.")
    spec = TeacherSpec(**{k: v for k, v in value.items() if k in TEACHER_KEYS}) if not problems else None
    return spec, problems


def resolve(path: str) -> Any:
    """The object an import path `package.module:attr.sub` names."""
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def load_dataset(spec: Any) -> list:
    """A list of dspy.Example from an import path (list or callable) or a JSONL file (local or URI)."""
    import dspy

    if isinstance(spec, str):
        obj = resolve(spec)
        data = obj() if callable(obj) else obj
        return list(data)
    text = _read_text(spec["path"])
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if spec.get("limit"):
        rows = rows[: spec["limit"]]
    missing = [i for i, r in enumerate(rows) if not set(spec["inputs"]) <= set(r)]
    if missing:
        raise ConfigError([f"{spec['path']}: rows {missing[:5]} lack input field(s) {spec['inputs']}; "
                           f"fix the rows or the inputs list."])
    return [dspy.Example(**r).with_inputs(*spec["inputs"]) for r in rows]


def _read_text(location: str) -> str:
    from bootfinetune.storage import filesystem, is_uri

    if is_uri(location):
        fs, path = filesystem(location)
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    return Path(location).expanduser().read_text()


def resolve_target(target: Any) -> Any:
    """`target`, with an import path `package.module:fn` replaced by what `fn()` returns (a model folder)."""
    if isinstance(target, str) and IMPORT_PATH.match(target):
        return str(resolve(target)())
    return target


class Teacher:
    """The job's teacher LM, and the scripted server behind it when there is one (stopped by `close`)."""

    def __init__(self, spec: TeacherSpec | None):
        import dspy

        self.server = None
        self.lm = None
        if spec is None:
            return
        extra = {k: getattr(spec, k) for k in ("temperature", "max_tokens", "num_retries") if getattr(spec, k) is not None}
        if spec.scripted:
            from bootfinetune.teacher_server import TeacherServer

            # Bootstrap actors may run on other nodes: bind to this node's address when the cluster has several.
            host = "127.0.0.1" if _single_node() else _node_ip()
            # A port derived from the script's name: the teacher's address is part of the run's identity,
            # so the same config finds the same run directory in the next job (bootstrap, then compile).
            port = 30000 + int(hashlib.sha256(spec.scripted.encode()).hexdigest()[:8], 16) % 20000
            try:
                self.server = TeacherServer(resolve(spec.scripted), host=host, port=port).start()
            except OSError:  # taken: any free port (this run will not share a directory with others)
                self.server = TeacherServer(resolve(spec.scripted), host=host).start()
            self.lm = dspy.LM("openai/scripted-teacher", api_base=self.server.url, api_key="scripted", cache=False,
                              **extra)
        else:
            key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
            self.lm = dspy.LM(spec.model, api_base=spec.api_base, api_key=key, cache=False, **extra)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def _single_node() -> bool:
    import ray

    return not ray.is_initialized() or len([n for n in ray.nodes() if n.get("Alive")]) <= 1


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def check_environment(job: JobConfig) -> None:
    """What the cluster must provide, checked before the first teacher call: the API key variable, the bucket."""
    problems = []
    if job.teacher is not None and job.teacher.api_key_env and not os.environ.get(job.teacher.api_key_env):
        problems.append(f"teacher.api_key_env: {job.teacher.api_key_env} is not set in the job's environment; "
                        f"pass it by name, e.g. ray job submit --runtime-env-json "
                        f"'{{\"env_vars\": {{\"{job.teacher.api_key_env}\": \"...\"}}}}', or set it on the cluster.")
    storage = job.config.run.storage_path
    from bootfinetune.storage import check_writable, is_uri

    if is_uri(storage):
        problem = check_writable(storage)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)


def _setup_logging() -> None:
    if not any(getattr(h, "_bootfinetune_job", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[bootfinetune] %(message)s"))
        handler._bootfinetune_job = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _parser(description: str, config: bool = True, run_dir: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    if config:
        p.add_argument("--config", required=not run_dir, help="the job YAML (see ray_jobs/configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key of the YAML (repeatable), e.g. --set epochs=3")
    if run_dir:
        p.add_argument("--run-dir", required=True, help="the run's folder or URI (as the compile printed it)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: the job's own cluster)")
    return p


def _connect(job: JobConfig | None, address: str | None) -> None:
    from bootfinetune.ray_env import ensure_ray

    ensure_ray(address or (job.config.run.ray_address if job else None))


def _result(kind: str, **fields: Any) -> int:
    """Prints the job's one-line JSON result (what a CI script or a caller parses), returns 0."""
    print("BOOTFINETUNE_RESULT " + json.dumps({"job": kind, **fields}, default=str), flush=True)
    return 0


@contextlib.contextmanager
def _teleprompter(args: argparse.Namespace) -> Iterator[tuple[Any, JobConfig, list, list | None, dict[str, Any]]]:
    """Checks the config and the environment, connects, loads the data, starts the teacher; yields
    (BootstrapFinetune, job, trainset, valset, compile() arguments) and stops the teacher after."""
    _setup_logging()
    job = load_job_config(args.config, args.set)
    _connect(job, args.ray_address)
    check_environment(job)
    from bootfinetune import BootstrapFinetune

    trainset, valset = load_dataset(job.trainset), (load_dataset(job.valset) if job.valset else None)
    teacher = Teacher(job.teacher)
    try:
        options, train_args = _split_options(job)
        tp = BootstrapFinetune(metric=resolve(job.metric) if job.metric else None,
                               teacher_settings={"lm": teacher.lm} if teacher.lm else {}, **options)
        yield tp, job, trainset, valset, train_args
    finally:
        teacher.close()


def main_compile(argv: list[str] | None = None) -> int:
    """`ray_jobs/compile.py`: a YAML config -> a compiled program and its run directory."""
    args = _parser("Compile a DSPy program with bootfinetune (bootstrap, finetune, rebind, evaluate).").parse_args(argv)
    started = time.time()
    with _teleprompter(args) as (tp, job, trainset, valset, train_args):
        tp.compile(_program(job), trainset=trainset, valset=valset, **train_args)
    return _result("compile", run_dir=tp.run_dir.location, metric=tp.report.get("metric"),
                   seconds=round(time.time() - started, 1))


def main_bootstrap(argv: list[str] | None = None) -> int:
    """`ray_jobs/bootstrap.py`: checks, bootstrapping and the data stage only."""
    args = _parser("Run the teacher over the trainset (Ray Data) and write the finetuning data.").parse_args(argv)
    with _teleprompter(args) as (tp, job, trainset, valset, train_args):
        prepared = tp.prepare(_program(job), trainset=trainset, valset=valset, **train_args)
    s = prepared.bootstrap.summary
    return _result("bootstrap", run_dir=prepared.run.location, kept=s.kept, examples=s.examples, failed=s.failed,
                   records={k: d.records for k, d in prepared.data.items()})


def main_finetune(argv: list[str] | None = None) -> int:
    """`ray_jobs/finetune.py`: trains a run's models from the data a bootstrap saved, then writes program.json."""
    p = _parser("Finetune the models of a run from its saved data (no teacher calls).", config=False, run_dir=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a resource option for this job (num_workers, use_gpu, cpus_per_worker, "
                        "gpus_per_worker, max_failures)")
    args = p.parse_args(argv)
    _setup_logging()
    from bootfinetune.finetune import FinetuneJob, finetune_models
    from bootfinetune.rundir import RunDir, read_json, write_json

    run = RunDir.from_location(args.run_dir)
    run.pull()
    if not run.config_json.exists() or not run.data_dir.exists():
        raise ConfigError([f"--run-dir {args.run_dir}: no config.json or data/ there; run ray_jobs/bootstrap.py "
                           f"(or compile.py) first, and pass the run directory it printed."])
    described = read_json(run.config_json)
    flat = {k: v for group in described["options"].values() for k, v in group.items()}
    allowed = {"num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker", "max_failures"}
    import yaml

    for item in args.set:
        key, _, value = item.partition("=")
        if key not in allowed:
            raise ConfigError([f"--set {key}: finetune.py changes only {', '.join(sorted(allowed))}; other options "
                               f"change what the models are, so compile a new run instead."])
        flat[key] = yaml.safe_load(value)
    config = Config.from_options(**flat)
    _connect(None, args.ray_address)
    jobs = []
    for key, spec in described["model_keys"].items():
        train_file = run.data_file(key)
        if not train_file.exists():
            raise ConfigError([f"--run-dir: {train_file} is missing; the bootstrap of this run did not finish."])
        eval_file = run.data_dir / "val" / f"{key}.jsonl"
        jobs.append(FinetuneJob(key=key, target=spec["target"], predictors=tuple(spec["predictors"]),
                                train_file=train_file, eval_file=eval_file if eval_file.exists() else None))
    manifests = finetune_models(run, jobs, config.train)
    note = _write_program(run, described, config)
    run.update_report(stages={"finetune": {k: {"best_epoch": m["best_epoch"], "eval_loss": m["losses"]["eval"]}
                                           for k, m in manifests.items()}})
    run.sync()
    return _result("finetune", run_dir=run.location, models={k: str(run.model_dir(k)) for k in manifests},
                   best_epoch={k: m["best_epoch"] for k, m in manifests.items()}, program=note)


def _write_program(run: Any, described: dict, config: Config) -> str:
    """program.json for `bootfinetune.load`, when the program class imports here."""
    from bootfinetune.rebind import program_state, rebind
    from bootfinetune.rundir import write_json

    try:
        program = resolve(described["program_class"])()
    except Exception as e:
        return f"program.json not written: {described.get('program_class')} does not import here ({e})"
    key_of = {name: key for key, spec in described["model_keys"].items() for name in spec["predictors"]}
    compiled = rebind(program, key_of, {k: str(run.model_dir(k)) for k in described["model_keys"]},
                      exclude_demos=config.bootstrap.exclude_demos, inference=config.inference)
    write_json(run.program_json, program_state(compiled))
    return "written"


def main_evaluate(argv: list[str] | None = None) -> int:
    """`ray_jobs/evaluate.py`: scores a finished run's compiled program on a valset, over Ray."""
    p = _parser("Score a compiled run on a valset (metric over Ray Data actors).", config=True, run_dir=True)
    p.add_argument("--name", default="eval", help="name of the evaluation in the run's evaluations/ folder")
    args = p.parse_args(argv)
    _setup_logging()
    from bootfinetune import load
    from bootfinetune.evaluate import evaluate_program
    from bootfinetune.rundir import RunDir, write_json

    job = load_job_config(args.config, args.set, need=("valset", "metric")) if args.config else None
    if job is None:
        raise ConfigError(["--config: evaluate.py needs a job YAML naming valset and metric."])
    _connect(job, args.ray_address)
    run = RunDir.from_location(args.run_dir)
    program = load(args.run_dir)
    valset = load_dataset(job.valset)
    b = job.config.bootstrap
    result = evaluate_program(program, valset, resolve(job.metric), num_threads=b.num_threads,
                              num_actors=b.num_actors)
    out = {"score": result.score, "examples": len(valset), "failed": result.failed,
           "seconds": result.seconds, "valset": job.valset, "metric": job.metric}
    write_json(run.root / "evaluations" / f"{args.name}.json", out)
    run.sync()
    log.info("evaluate: %s on %d examples", result.score, len(valset))
    return _result("evaluate", run_dir=run.location, **out)


COMPILE_ARGS = ("target", "bsize", "accumsteps", "lr", "epochs", "bf16")
"""Options that are `compile()`'s own documented arguments: passed there, where they take precedence."""


def _split_options(job: JobConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor options, compile() arguments), the target resolved when it is an import path."""
    options = dict(job.options)
    args = {k: options.pop(k) for k in COMPILE_ARGS if k in options}
    if "target" in args:
        args["target"] = resolve_target(args["target"])
    return options, args


def _program(job: JobConfig) -> Any:
    obj = resolve(job.program)
    return obj()


def run_main(fn: Any) -> None:
    """Runs an entrypoint: a ConfigError prints its problems and exits 2 (nothing ran)."""
    try:
        sys.exit(fn())
    except (ConfigError, ProgramError) as e:
        print("error: the job did not start:", file=sys.stderr)
        for problem in e.problems:
            print(f"  - {problem}", file=sys.stderr)
        sys.exit(2)
