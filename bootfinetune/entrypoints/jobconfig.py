"""The Ray jobs' YAML config: one flat mapping, checked in full before any work.

A job config is one flat YAML mapping. Its keys are the job's own (`program`, `trainset`,
`valset`, `metric`, `teacher`) and any field of `bootfinetune.Config` (`target`, `epochs`,
`storage_path`, `zero_stage`, ...), checked by the same code as `compile(**options)`:

```yaml
program: bootfinetune.demo.task:ShippingRouter     # package.module:attr, called with no arguments
metric: bootfinetune.demo.task:metric
trainset: bootfinetune.demo.task:demo_trainset     # a list, a callable returning one, or a JSONL file:
valset: {path: s3://bucket/val.jsonl, inputs: [message]}
teacher: {model: openai/gpt-4o-mini, api_key_env: OPENAI_API_KEY}   # the key's *name*, never the key
                                                  # (and timeout: seconds per attempt, default 120)
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

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootfinetune.config import FIELD_OWNER, Config
from bootfinetune.errors import ConfigError
from bootfinetune.common.importpath import resolve
from bootfinetune.common.suggestions import did_you_mean
from bootfinetune.common.redaction import redact_uri
from bootfinetune.run.storage import check_writable, filesystem, is_uri
from bootfinetune.entrypoints.teachers import DEFAULT_TEACHER_TIMEOUT

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
TEACHER_KEYS = {"model", "api_base", "api_key_env", "scripted", "temperature", "max_tokens", "num_retries", "timeout"}
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
    """Retries of a failed call, with backoff (DSPy's default: 3)."""
    timeout: float = DEFAULT_TEACHER_TIMEOUT
    """Seconds each attempt of a teacher call may wait for its answer (a hung endpoint frees its actor slot)."""


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
    config: Config = field(default_factory=Config)
    """The checked configuration those options make (the rest at their defaults)."""
    source: str | None = None
    """The file it was read from."""


JOB_KEYS = {f.name for f in dataclasses.fields(JobConfig)} - {"options", "config", "source"}


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
        raw[key.strip()] = parse_set_value(value)
    return parse_job_config(raw, where, need=need)


def parse_set_value(text: str) -> Any:
    """The value of a `--set key=value`: YAML, with `1e-4` read as a number (YAML 1.1 wants `1.0e-4`).

    >>> parse_set_value("1e-4"), parse_set_value("3"), parse_set_value("true"), parse_set_value("cosine")
    (0.0001, 3, True, 'cosine')
    """
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


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
            problems.append(f"{where}: unknown key {key!r}." + did_you_mean(key, sorted(JOB_KEYS | set(FIELD_OWNER)))
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
    config = None
    try:
        config = Config.from_options(**options)
    except ConfigError as e:
        problems += [f"{where}: {p}" for p in e.problems]
    if problems or config is None:
        raise ConfigError(problems)
    return JobConfig(program=raw.get("program"), trainset=raw.get("trainset"), valset=raw.get("valset"),
                     metric=raw.get("metric"), teacher=teacher, options=options, config=config, source=where)


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
        problems.append(f"{where}: teacher.{key}: unknown." + did_you_mean(key, sorted(TEACHER_KEYS))
                        + f" Known: {', '.join(sorted(TEACHER_KEYS))}.")
    if bool(value.get("model")) == bool(value.get("scripted")):
        problems.append(f"{where}: teacher: give exactly one of model (a LiteLLM name) or scripted (an import path).")
    if value.get("scripted"):
        problems += _check_import(where, "teacher.scripted", value["scripted"])
    env = value.get("api_key_env")
    if env is not None and (not isinstance(env, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", env)):
        problems.append(f"{where}: teacher.api_key_env={env!r}: the *name* of an environment variable, "
                        f"e.g. OPENAI_API_KEY.")
    timeout = value.get("timeout", DEFAULT_TEACHER_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        problems.append(f"{where}: teacher.timeout={timeout!r}: seconds each attempt of a teacher call may wait, "
                        f"a number > 0 (default {DEFAULT_TEACHER_TIMEOUT:g}).")
    spec = TeacherSpec(**{k: v for k, v in value.items() if k in TEACHER_KEYS}) if not problems else None
    return spec, problems


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


def dataset_problems(job: JobConfig, keys: tuple[str, ...] = ("trainset", "valset")) -> list[str]:
    """A JSONL dataset (`{path: ...}`) of `keys` that is not there: named, with the fix (import paths resolve
    when the config is read)."""
    problems = []
    for key in keys:
        spec = getattr(job, key)
        if not isinstance(spec, dict):
            continue
        location = spec["path"]
        if is_uri(location):
            try:
                fs, path = filesystem(location)
                found = fs.get_file_info(path).is_file
            except Exception as e:  # pyarrow raises OSError/ArrowInvalid variants for URIs it cannot reach
                problems.append(f"{key}.path: {redact_uri(location)} cannot be read ({type(e).__name__}); check the "
                                f"URI and the credentials on the cluster.")
                continue
        else:
            found = Path(location).expanduser().is_file()
        if not found:
            problems.append(f"{key}.path: {redact_uri(location)}: no such file; give the JSONL file's path (relative "
                            f"to the job's working directory) or its s3:// / gs:// URI.")
    return problems


def check_environment(job: JobConfig, datasets: tuple[str, ...] = ("trainset", "valset")) -> None:
    """What the job's environment must provide, checked before Ray starts and the first teacher call: the API
    key variable, the JSONL files of `datasets`, the bucket."""
    problems = dataset_problems(job, datasets)
    if job.teacher is not None and job.teacher.api_key_env and not os.environ.get(job.teacher.api_key_env):
        problems.append(f"teacher.api_key_env: {job.teacher.api_key_env} is not set in the job's environment; "
                        f"set it where `ray start` runs on the cluster (a secret there) and pass it by name, as "
                        f"cluster/runtime_env.yaml does ({job.teacher.api_key_env}: \"${{{job.teacher.api_key_env}}}\"); "
                        f"never put its value in --runtime-env-json, which Ray keeps in the job's metadata.")
    storage = job.config.run.storage_path
    if is_uri(storage):
        problem = check_writable(storage)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
