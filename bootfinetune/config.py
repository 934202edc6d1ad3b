"""The one typed configuration of a compile, checked in one pass.

Four groups, one per concern; their field names are unique across groups so that
`compile(**options)` and a flat YAML file can name any field directly:

- `BootstrapConfig`: how the teacher runs over the trainset and what is kept.
- `TrainConfig`: what is finetuned and how (DeepSpeed, Ray Train resources).
- `RunOptions`: where the run lives and which Ray cluster runs it.
- `InferenceConfig`: how the finetuned LMs generate, and whether the valset is scored.

Each field is the one home of its option: its type (choices as `Literal`), its default, its
range (`option(at_least=...)`, `option(within=...)`), whether it is resource-only (how fast
or where a run goes, not what it produces: `RESOURCE_OPTIONS`, left out of every identity)
and its help (the docstring under it, `FIELD_HELP`). Validation (`Config.problems`), the
command-line flags (`bootfinetune.entrypoints.flags`) and the YAML job keys (`bootfinetune.entrypoints.jobconfig`)
are generated from them.

`Config.from_options(**flat)` routes each name to its group, raises on unknown names
(with the closest known one), and `Config.validate()` reports every problem at once.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from bootfinetune.errors import ConfigError
from bootfinetune.common.names import run_name_problem
from bootfinetune.common.suggestions import did_you_mean

DEFAULT_TEACHER_TIMEOUT = 120.0
"""Seconds each attempt of a teacher call may wait (LiteLLM's own default is 600 s): the CLI's and the jobs' teacher
LMs get it, and a teacher LM built in Python that sets no `timeout` gets it in the bootstrap actors."""
DEFAULT_STORAGE = "./bootfinetune_runs"
STORAGE_ENV = "BOOTFINETUNE_STORAGE"


def default_storage() -> str:
    """$BOOTFINETUNE_STORAGE, else ./bootfinetune_runs.

    An empty variable counts as unset (a runtime_env's "${BOOTFINETUNE_STORAGE}" gives "" where unset).
    """
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def option(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, resource: bool = False,
           at_least: int | None = None, within: tuple[float, float | None] | None = None, open_low: bool = False,
           hint: str | None = None) -> Any:
    """A config field with its rules; a plain default (`multitask: bool = True`) has none but its type's.

    Args:
        default: The default value (written here only). factory: a function giving it instead.
        resource: The option changes how fast or where a run goes, not what it produces.
        at_least: An integer >= this. within: a number in [lo, hi] (hi None: no upper bound).
        open_low: `within`'s lower bound is excluded. hint: the fix for a value outside a `Literal`.
    """
    metadata = {"resource": resource, "at_least": at_least, "within": within, "open_low": open_low, "hint": hint}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class BootstrapConfig:
    """How the teacher program runs over the trainset (Ray Data) and which traces are kept."""

    num_actors: int = option(2, resource=True, at_least=1)
    """Ray Data actors running the teacher program; each holds its own copy of the program."""
    num_threads: int = option(8, resource=True, at_least=1)
    """Teacher calls each actor keeps in flight at once (teacher calls are I/O-bound)."""
    actor_cpus: float = option(0.5, resource=True, within=(0, None), open_low=True)
    """Logical CPUs reserved per bootstrap actor (they mostly wait on the network)."""
    batch_size: int = option(16, resource=True, at_least=1)
    """Examples handed to an actor at a time (at least num_threads / 2 are); they share the actor's slots."""
    engine: Literal["auto", "async", "threads"] = option(
        "auto", resource=True, hint="use 'auto', 'async' (the program's aforward) or 'threads' (its forward).")
    """How actors run the teacher: "auto" runs a program whose class defines `aforward` (dspy.Predict,
    dspy.ChainOfThought) on an event loop and one with only `forward` on num_threads threads."""
    max_calls_per_second: float | None = option(None, resource=True, within=(0, None), open_low=True)
    """The teacher's request budget, shared by every actor on the cluster (a provider's RPM / 60); None: none."""
    max_tokens_per_minute: int | None = option(None, resource=True, at_least=1)
    """The teacher's token budget (prompt + completion), shared by every actor on the cluster; None: none."""
    trace_upload_every: int = option(100, resource=True, at_least=1)
    """Cloud storage_path: new teacher results go up to the trace store after this many, or trace_upload_s."""
    trace_upload_s: float = option(30.0, resource=True, within=(0, None), open_low=True)
    """Cloud storage_path: new teacher results go up at least this often (seconds): what a killed driver loses."""
    max_retry_after_s: float = option(60.0, resource=True, within=(0, None), open_low=True)
    """The longest wait a teacher's Retry-After may impose (DSPy's own retries, and every actor's pause after a 429)."""
    max_errors: int = option(10, resource=True, at_least=0)
    """Failed examples tolerated; one more stops the bootstrap with the first few errors."""
    metric_threshold: float | None = option(None, within=(float("-inf"), None))
    """For float metrics: keep a trace when score >= threshold. None keeps any truthy score."""
    multitask: bool = True
    """One shared model for all predictors (data key "all"), else one model per predictor."""
    exclude_demos: bool = False
    """Leave the student's demos out of the training prompts (and out of the compiled program)."""
    drop_duplicates: bool = False
    """Keep identical finetuning records once; DSPy keeps every copy, so inputs seen often weigh more."""


@dataclass
class TrainConfig:
    """What is finetuned and how: the model, the optimisation, DeepSpeed and Ray Train resources."""

    target: str | dict[str, str] = "t5-large"
    """Hugging Face model id or local directory; or {predictor_name: target} per predictor."""
    bsize: int = option(12, at_least=1)
    """Micro batch size per worker."""
    accumsteps: int = option(1, at_least=1)
    """Gradient accumulation steps."""
    lr: float = option(5e-5, within=(0, 1.0), open_low=True)
    """Peak learning rate."""
    epochs: int = option(1, at_least=1)
    """Passes over the finetuning data."""
    bf16: bool = False
    """Train in bfloat16 (mixed precision through DeepSpeed)."""
    max_length: int = option(1024, at_least=8)
    """Longest tokenized sequence; longer ones are cut from the prompt side and counted."""
    warmup_ratio: float = option(0.1, within=(0, 1.0))
    """Fraction of optimizer steps spent warming the learning rate up from 0."""
    lr_schedule: Literal["linear", "cosine", "constant"] = option(
        "linear", hint="use 'linear', 'cosine' or 'constant'.")
    """Learning-rate decay after warmup: "linear", "cosine" or "constant"."""
    weight_decay: float = option(0.0, within=(0, 1.0))
    """AdamW weight decay."""
    adam_beta1: float = option(0.9, within=(0, 1.0))
    """AdamW beta1 (first-moment decay)."""
    adam_beta2: float = option(0.999, within=(0, 1.0))
    """AdamW beta2 (second-moment decay); 0.95 adapts faster on small, shifting gradients."""
    max_grad_norm: float = option(1.0, within=(0, None))
    """Clip gradients to this global norm; 0 turns clipping off."""
    zero_stage: Literal["auto", 0, 1, 2, 3] = option(
        "auto", hint="DeepSpeed ZeRO stage must be 'auto', 0, 1, 2 or 3.")
    """DeepSpeed ZeRO stage: "auto" (by the model's size: when the model and its optimizer state fit each
    worker, plain torch on one worker (no DeepSpeed) or ZeRO-1 on several; ZeRO-2/3 and offload when not; the
    manifest's `engine` says which and why), or 0, 1, 2 or 3 (DeepSpeed's engine at that stage)."""
    offload_optimizer: bool = False
    """Offload optimizer state to CPU memory (ZeRO-1/2/3; with zero_stage="auto" it is kept and a stage
    that allows it is chosen)."""
    offload_params: bool = False
    """Offload parameters to CPU memory (ZeRO-3 only; with zero_stage="auto", ZeRO-3 is chosen)."""
    gradient_checkpointing: Literal["auto", True, False] = option(
        "auto", resource=True, hint="use 'auto' (on when the memory estimate says so), True or False.")
    """Recompute activations in the backward pass (about a third more compute, far less memory): "auto" turns it
    on only when a micro batch's activations would not fit beside the model states (the manifest's `engine`
    says so and why); True or False decide."""
    compile_layers: bool = option(False, resource=True)
    """`torch.compile` each decoder layer (the model's `_no_split_modules` blocks), shapes dynamic: faster steps
    after a one-time compile, so for runs of many steps; not with ZeRO-3 (skipped, logged)."""
    lora: bool = False
    """Train LoRA adapters (PEFT) instead of every weight: the base stays frozen, one small adapter per model."""
    lora_r: int = option(16, at_least=1)
    """LoRA rank."""
    lora_alpha: int = option(32, within=(0, None), open_low=True)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = option(0.05, within=(0, 0.9))
    """Dropout on the LoRA branch's input."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: "all-linear" (every linear layer but the output head) or a list of names."""
    lora_export: Literal["adapter", "merged"] = option(
        "adapter", hint="use 'adapter' (PEFT adapter) or 'merged' (a full model).")
    """"adapter": models/{key}/ holds the PEFT adapter (the base is loaded once and shared between
    adapters); "merged": the adapter folded into a full model."""
    answer_logits_only: bool = True
    """Causal models with a plain LM head: compute logits only at answer positions (the same loss;
    the head's time and the full-vocabulary logits of the prompt are saved)."""
    packing: bool = True
    """Causal models: pack each micro batch's `bsize` records into as few rows of at most max_length tokens as
    fit (attention never crosses records: position ids restart per record), instead of one padded row each.
    The same records, steps and loss per step as unpacked, less padding. Seq2seq models, and causal ones whose
    attention mask transformers does not build (remote code), keep a record a row (manifest: engine.packed)."""
    seed: int = option(0, at_least=0)
    """Seed for data order, held-out split and initialisation of new weights."""
    eval_fraction: float = option(0.1, within=(0, 0.5))
    """Share of the finetuning data held out for eval loss when no valset is given."""
    num_workers: int = option(1, at_least=1)
    """Ray Train workers per model (data parallel ranks)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL) instead of CPUs (gloo)."""
    cpus_per_worker: float = option(1.0, resource=True, within=(0, None))
    """Logical CPUs reserved per training worker."""
    gpus_per_worker: float = option(1.0, resource=True, within=(0, None), open_low=True)
    """GPUs per training worker when use_gpu is set."""
    resources_per_worker: dict[str, float] | None = option(None, resource=True)
    """Other Ray resources per training worker (Ray ScalingConfig's name): a custom resource or an accelerator
    type, e.g. {"accelerator_type:A100": 0.001}. Evaluation and model exports ask for the same (and the GPUs)."""
    max_failures: int = option(2, resource=True, at_least=0)
    """Times Ray Train restarts failed workers from the last checkpoint before giving up."""
    trust_remote_code: bool = False
    """Allow model code from the target's repository to run. Off unless you trust it."""


@dataclass
class RunOptions:
    """Where the run directory lives and which Ray cluster runs the stages."""

    storage_path: str = option(factory=default_storage, resource=True)
    """Folder (or cloud URI) holding run directories; default $BOOTFINETUNE_STORAGE or ./bootfinetune_runs."""
    run_name: str | None = option(None, resource=True)
    """Run directory name; None derives it from the inputs so the same compile resumes."""
    ray_address: str | None = option(None, resource=True)
    """Ray cluster address; None joins a running cluster or starts a local one."""
    writer_wait_s: float = option(0.0, resource=True, within=(0, None))
    """Seconds to wait when another process writes the same run; 0 stops at once with an error naming it."""
    writer_lease_s: float = option(180.0, resource=True, within=(2, None))
    """Cloud storage_path: seconds a writer's lease on the run lasts unrenewed; a crashed writer's is taken over after."""
    mlflow_tracking_uri: str | None = option(None, resource=True)
    """MLflow tracking URI for training runs (a run per model key: options, step loss, eval loss per epoch);
    None: MLflow's own ($MLFLOW_TRACKING_URI, mlflow.set_tracking_uri, an active run), else no tracking.
    Needs `pip install 'bootfinetune[mlflow]'`."""
    verbose: bool = option(False, resource=True)
    """Show Ray's own lines (Ray Data's per-dataset lines, workers' output such as Ray Train's warnings) and
    every repeated DSPy warning; off, they stay in Ray's session logs and a terminal-less output gets one line
    per stage and progress lines at a bounded rate."""


@dataclass
class InferenceConfig:
    """How the compiled program's finetuned LMs generate, and whether the valset is scored."""

    max_tokens: int = option(512, at_least=1)
    """New tokens per answer when a call or request does not say (at most `max_tokens_ceiling`)."""
    max_tokens_ceiling: int | None = option(None, at_least=1)
    """Most new tokens any answer may have; served requests asking more are clamped to it. None: from
    the longest training answer L, max(2L, L+64) up to 4096 (max_tokens for a model without that record)."""
    generate_batch_size: int = option(8, at_least=1)
    """Most prompts per batched `generate` call."""
    device: str | None = None
    """Where the finetuned LMs run ("cpu", "cuda", "cuda:1"); None picks CUDA when present. It describes the Ray
    workers that run them: a driver without CUDA loads the compiled program's models on its CPU."""
    evaluate: bool = True
    """Score the base student, the teacher and the compiled program on the valset."""
    eval_threads: int = option(32, resource=True, at_least=1)
    """Threads that run valset examples while scoring (per actor on Ray); the finetuned LMs batch up to this many."""


GROUPS: dict[str, type] = {"bootstrap": BootstrapConfig, "train": TrainConfig, "run": RunOptions,
                           "inference": InferenceConfig}

FIELDS: dict[str, dataclasses.Field] = {f.name: f for cls in GROUPS.values() for f in dataclasses.fields(cls)}
"""Every option's field, by flat name, in group order."""
FIELD_OWNER: dict[str, str] = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}
"""The group (bootstrap, train, run, inference) each option belongs to."""
FIELD_TYPES: dict[str, Any] = {name: hint for cls in GROUPS.values()
                               for name, hint in typing.get_type_hints(cls).items()}
RESOURCE_OPTIONS: frozenset[str] = frozenset(name for name, f in FIELDS.items() if f.metadata.get("resource"))
"""Options that change how fast or where a run goes, not what it produces: left out of run names, trace
and model identities, so a rerun with more actors or workers resumes the same run (num_workers and
use_gpu are not among them: the global batch and the precision path)."""


def _field_help(cls: type) -> dict[str, str]:
    """The docstring under each field of `cls`, by name (the help of its flag)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    helps = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            helps[node.target.id] = " ".join(after.value.value.split())
    return helps


FIELD_HELP: dict[str, str] = {name: text for cls in GROUPS.values() for name, text in _field_help(cls).items()}


def identity_options(config: "Config", group: str | None = None) -> dict[str, Any]:
    """The options of `config` (or of one group) that decide what a run produces: all but `RESOURCE_OPTIONS`."""
    values = config.to_flat() if group is None else dataclasses.asdict(getattr(config, group))
    return {k: v for k, v in values.items() if k not in RESOURCE_OPTIONS}


@dataclass
class Config:
    """A compile's whole configuration."""

    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    """Bootstrapping options."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Finetuning options."""
    run: RunOptions = field(default_factory=RunOptions)
    """Storage and cluster options."""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    """Generation and evaluation options."""

    @classmethod
    def from_options(cls, **options: Any) -> "Config":
        """Builds a config from flat option names, checks it, and raises one ConfigError listing every problem."""
        return cls().replace(**options)

    @classmethod
    def from_dict(cls, groups: dict[str, dict[str, Any]]) -> "Config":
        """The config `to_dict` wrote (config.json's "options"), checked; groups it lacks keep their defaults."""
        return cls.from_options(**{k: v for values in groups.values() for k, v in values.items()})

    def replace(self, **options: Any) -> "Config":
        """A copy with some flat options changed, checked again (unknown names and bad values in one ConfigError)."""
        problems = unknown_option_problems(options)
        grouped: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
        for name, value in options.items():
            if name in FIELD_OWNER:
                grouped[FIELD_OWNER[name]][name] = value
        config = Config(**{g: dataclasses.replace(getattr(self, g), **kw) for g, kw in grouped.items()})
        problems += config.problems()
        if problems:
            raise ConfigError(problems)
        return config

    def to_flat(self) -> dict[str, Any]:
        flat = {}
        for group in GROUPS:
            flat.update(dataclasses.asdict(getattr(self, group)))
        return flat

    def to_dict(self) -> dict[str, Any]:
        return {group: dataclasses.asdict(getattr(self, group)) for group in GROUPS}

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Every problem with the values, each naming the field and the fix (in field order)."""
        p: list[str] = []
        for group in GROUPS:
            values = getattr(self, group)
            for name in (f.name for f in dataclasses.fields(values)):
                value = getattr(values, name)
                if not (value is None and type(None) in typing.get_args(FIELD_TYPES[name])):
                    p += _field_problems(name, value)
                if name in _EXTRA_CHECKS:
                    p += _EXTRA_CHECKS[name](self, value)
        return p


def _field_problems(name: str, value: Any) -> list[str]:
    """The checks a field's type and `option(...)` rules give."""
    hint, meta = FIELD_TYPES[name], FIELDS[name].metadata
    if hint is bool:
        return [] if isinstance(value, bool) else [f"{name}={value!r}: must be True or False."]
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        ok = value in choices and (not isinstance(value, bool) or any(isinstance(c, bool) for c in choices))
        return [] if ok else [f"{name}={value!r}: {meta['hint']}"]
    if meta.get("at_least") is not None:
        minimum = meta["at_least"]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return [f"{name}={value!r}: must be an integer >= {minimum}; set {name} to e.g. {max(minimum, 1)}."]
    elif meta.get("within") is not None:
        (lo, hi), lo_open = meta["within"], meta["open_low"]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
            return [f"{name}={value!r}: must be a number in {rng}; change {name}."]
    return []


def _target(config: Config, target: Any) -> list[str]:
    if isinstance(target, dict):
        if not target or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in target.items()):
            return ["target: a dict must map predictor names to non-empty model ids or directories."]
    elif not isinstance(target, str) or not target:
        return [f"target={target!r}: give a Hugging Face model id or a local model directory."]
    return []


def _offload(config: Config, _: Any) -> list[str]:
    t, p = config.train, []
    if t.offload_params is True and t.zero_stage not in (3, "auto"):
        p.append("offload_params=True needs zero_stage=3; set zero_stage=3 or offload_params=False.")
    if t.offload_optimizer is True and t.zero_stage not in (1, 2, 3, "auto"):
        p.append("offload_optimizer=True needs zero_stage 1, 2 or 3; raise zero_stage or turn offload off.")
    return p


def _lora_targets(config: Config, targets: Any) -> list[str]:
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(x, str) and x for x in targets)):
        return [f"lora_target_modules={targets!r}: give 'all-linear' or a list of module names "
                "such as ['q_proj', 'v_proj']."]
    return []


def _storage_path(config: Config, path: Any) -> list[str]:
    if not isinstance(path, str) or not path:
        return [f"storage_path={path!r}: give a folder or a cloud URI (s3://..., gs://...)."]
    return []


def _run_name(config: Config, name: Any) -> list[str]:
    if name is not None and (problem := run_name_problem(name)):
        return [problem]
    if name == "traces":
        return ["run_name='traces': that folder holds the teacher traces of every run; choose another name."]
    return []


def _ray_address(config: Config, address: Any) -> list[str]:
    if address is not None and not isinstance(address, str):
        return [f"ray_address={address!r}: give an address such as 'auto' or 'ray://host:10001'."]
    return []


def _mlflow_uri(config: Config, uri: Any) -> list[str]:
    if uri is not None and (not isinstance(uri, str) or not uri):
        return ["mlflow_tracking_uri: give a URI such as 'http://host:5000' or 'file:///path/mlruns', or None."]
    return []


def _resources(config: Config, resources: Any) -> list[str]:
    if resources is not None and not (isinstance(resources, dict) and all(
            isinstance(k, str) and k not in ("CPU", "GPU") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and v > 0 for k, v in resources.items())):
        return [f"resources_per_worker={resources!r}: give {{resource name: amount > 0}}, e.g. "
                f"{{'accelerator_type:A100': 0.001}}; CPUs and GPUs are cpus_per_worker and gpus_per_worker."]
    return []


def _device(config: Config, device: Any) -> list[str]:
    if device is not None and (not isinstance(device, str) or not device.startswith(("cpu", "cuda"))):
        return [f"device={device!r}: use 'cpu', 'cuda' or 'cuda:N', or None to pick automatically."]
    return []


_EXTRA_CHECKS: dict[str, Callable[[Config, Any], list[str]]] = {
    "target": _target, "offload_params": _offload, "lora_target_modules": _lora_targets,
    "storage_path": _storage_path, "run_name": _run_name, "ray_address": _ray_address, "device": _device,
    "mlflow_tracking_uri": _mlflow_uri, "resources_per_worker": _resources}
"""Rules a field's type and range cannot say, run right after that field's own checks."""


def unknown_option_problems(options: dict[str, Any]) -> list[str]:
    problems = []
    for name in options:
        if name not in FIELD_OWNER:
            problems.append(f"unknown option {name!r}.{did_you_mean(name, FIELD_OWNER)} Known options: {', '.join(sorted(FIELD_OWNER))}.")
    return problems
