"""The one typed configuration of a compile, checked in one pass.

Four groups, one per concern; their field names are unique across groups so that
`compile(**options)` and a flat YAML file can name any field directly:

- `BootstrapConfig`: how the teacher runs over the trainset and what is kept.
- `TrainConfig`: what is finetuned and how (DeepSpeed, Ray Train resources).
- `RunOptions`: where the run lives and which Ray cluster runs it.
- `InferenceConfig`: how the finetuned LMs generate, and whether the valset is scored.

`Config.from_options(**flat)` routes each name to its group, raises on unknown names
(with the closest known one), and `Config.validate()` reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from bootfinetune.errors import ConfigError

DEFAULT_STORAGE = "./bootfinetune_runs"
STORAGE_ENV = "BOOTFINETUNE_STORAGE"


@dataclass
class BootstrapConfig:
    """How the teacher program runs over the trainset (Ray Data) and which traces are kept."""

    num_actors: int = 2
    """Ray Data actors running the teacher program; each holds its own copy of the program."""
    num_threads: int = 8
    """Teacher calls each actor keeps in flight at once (teacher calls are I/O-bound)."""
    actor_cpus: float = 0.5
    """Logical CPUs reserved per bootstrap actor (they mostly wait on the network)."""
    batch_size: int = 16
    """Examples handed to an actor at a time; an actor runs a batch's examples concurrently."""
    max_errors: int = 10
    """Failed examples tolerated; one more stops the bootstrap with the first few errors."""
    metric_threshold: float | None = None
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
    bsize: int = 12
    """Micro batch size per worker."""
    accumsteps: int = 1
    """Gradient accumulation steps."""
    lr: float = 5e-5
    """Peak learning rate."""
    epochs: int = 1
    """Passes over the finetuning data."""
    bf16: bool = False
    """Train in bfloat16 (mixed precision through DeepSpeed)."""
    max_length: int = 1024
    """Longest tokenized sequence; longer ones are cut from the prompt side and counted."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps spent warming the learning rate up from 0."""
    lr_schedule: str = "linear"
    """Learning-rate decay after warmup: "linear", "cosine" or "constant"."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1 (first-moment decay)."""
    adam_beta2: float = 0.999
    """AdamW beta2 (second-moment decay); 0.95 adapts faster on small, shifting gradients."""
    max_grad_norm: float = 1.0
    """Clip gradients to this global norm; 0 turns clipping off."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    offload_optimizer: bool = False
    """Offload optimizer state to CPU memory (ZeRO-2/3)."""
    offload_params: bool = False
    """Offload parameters to CPU memory (ZeRO-3 only)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: bool = False
    """Train LoRA adapters (PEFT) instead of every weight: the base stays frozen, one small adapter per model."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: "all-linear" (every linear layer but the output head) or a list of names."""
    lora_export: str = "adapter"
    """"adapter": models/{key}/ holds the PEFT adapter (the base is loaded once and shared between
    adapters); "merged": the adapter folded into a full model."""
    answer_logits_only: bool = True
    """Causal models with a plain LM head: compute logits only at answer positions (the same loss;
    the head's time and the full-vocabulary logits of the prompt are saved)."""
    seed: int = 0
    """Seed for data order, held-out split and initialisation of new weights."""
    eval_fraction: float = 0.1
    """Share of the finetuning data held out for eval loss when no valset is given."""
    num_workers: int = 1
    """Ray Train workers per model (data parallel ranks)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL) instead of CPUs (gloo)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs reserved per training worker."""
    gpus_per_worker: float = 1.0
    """GPUs per training worker when use_gpu is set."""
    max_failures: int = 2
    """Times Ray Train restarts failed workers from the last checkpoint before giving up."""
    trust_remote_code: bool = False
    """Allow model code from the target's repository to run. Off unless you trust it."""


@dataclass
class RunOptions:
    """Where the run directory lives and which Ray cluster runs the stages."""

    # An empty $BOOTFINETUNE_STORAGE counts as unset (a runtime_env's "${BOOTFINETUNE_STORAGE}" gives "" where unset).
    storage_path: str = field(default_factory=lambda: os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE)
    """Folder (or cloud URI) holding run directories; default $BOOTFINETUNE_STORAGE or ./bootfinetune_runs."""
    run_name: str | None = None
    """Run directory name; None derives it from the inputs so the same compile resumes."""
    ray_address: str | None = None
    """Ray cluster address; None joins a running cluster or starts a local one."""


@dataclass
class InferenceConfig:
    """How the compiled program's finetuned LMs generate, and whether the valset is scored."""

    max_tokens: int = 512
    """Most new tokens per answer."""
    generate_batch_size: int = 8
    """Most prompts per batched `generate` call."""
    device: str | None = None
    """Where the finetuned LMs run ("cpu", "cuda", "cuda:1"); None picks CUDA when present."""
    evaluate: bool = True
    """Score the base student, the teacher and the compiled program on the valset."""


GROUPS: dict[str, type] = {"bootstrap": BootstrapConfig, "train": TrainConfig, "run": RunOptions,
                           "inference": InferenceConfig}


def _field_owner() -> dict[str, str]:
    owner = {}
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            owner[f.name] = group
    return owner


FIELD_OWNER = _field_owner()


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
        problems = unknown_option_problems(options)
        grouped: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
        for name, value in options.items():
            if name in FIELD_OWNER:
                grouped[FIELD_OWNER[name]][name] = value
        config = cls(**{g: GROUPS[g](**kw) for g, kw in grouped.items()})
        problems += config.problems()
        if problems:
            raise ConfigError(problems)
        return config

    def replace(self, **options: Any) -> "Config":
        """A copy with some flat options changed, checked again."""
        return Config.from_options(**{**self.to_flat(), **options})

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
        """Every problem with the values, each naming the field and the fix."""
        b, t, r, i = self.bootstrap, self.train, self.run, self.inference
        p: list[str] = []

        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                p.append(f"{name}={value!r}: must be an integer >= {minimum}; set {name} to e.g. {max(minimum, 1)}.")

        def number(name: str, value: Any, lo: float, hi: float | None, lo_open: bool = False) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
            if not ok:
                rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
                p.append(f"{name}={value!r}: must be a number in {rng}; change {name}.")

        def boolean(name: str, value: Any) -> None:
            if not isinstance(value, bool):
                p.append(f"{name}={value!r}: must be True or False.")

        positive_int("num_actors", b.num_actors)
        positive_int("num_threads", b.num_threads)
        number("actor_cpus", b.actor_cpus, 0, None, lo_open=True)
        positive_int("batch_size", b.batch_size)
        positive_int("max_errors", b.max_errors, minimum=0)
        if b.metric_threshold is not None:
            number("metric_threshold", b.metric_threshold, float("-inf"), None)
        boolean("multitask", b.multitask)
        boolean("exclude_demos", b.exclude_demos)
        boolean("drop_duplicates", b.drop_duplicates)

        if isinstance(t.target, dict):
            if not t.target or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in t.target.items()):
                p.append("target: a dict must map predictor names to non-empty model ids or directories.")
        elif not isinstance(t.target, str) or not t.target:
            p.append(f"target={t.target!r}: give a Hugging Face model id or a local model directory.")
        positive_int("bsize", t.bsize)
        positive_int("accumsteps", t.accumsteps)
        number("lr", t.lr, 0, 1.0, lo_open=True)
        positive_int("epochs", t.epochs)
        boolean("bf16", t.bf16)
        positive_int("max_length", t.max_length, minimum=8)
        number("warmup_ratio", t.warmup_ratio, 0, 1.0)
        if t.lr_schedule not in ("linear", "cosine", "constant"):
            p.append(f"lr_schedule={t.lr_schedule!r}: use 'linear', 'cosine' or 'constant'.")
        number("weight_decay", t.weight_decay, 0, 1.0)
        number("adam_beta1", t.adam_beta1, 0, 1.0)
        number("adam_beta2", t.adam_beta2, 0, 1.0)
        number("max_grad_norm", t.max_grad_norm, 0, None)
        if t.zero_stage not in (0, 1, 2, 3) or isinstance(t.zero_stage, bool):
            p.append(f"zero_stage={t.zero_stage!r}: DeepSpeed ZeRO stage must be 0, 1, 2 or 3.")
        boolean("offload_optimizer", t.offload_optimizer)
        boolean("offload_params", t.offload_params)
        if t.offload_params is True and t.zero_stage != 3:
            p.append("offload_params=True needs zero_stage=3; set zero_stage=3 or offload_params=False.")
        if t.offload_optimizer is True and t.zero_stage not in (1, 2, 3):
            p.append("offload_optimizer=True needs zero_stage 1, 2 or 3; raise zero_stage or turn offload off.")
        boolean("gradient_checkpointing", t.gradient_checkpointing)
        boolean("answer_logits_only", t.answer_logits_only)
        boolean("lora", t.lora)
        positive_int("lora_r", t.lora_r)
        number("lora_alpha", t.lora_alpha, 0, None, lo_open=True)
        number("lora_dropout", t.lora_dropout, 0, 0.9)
        targets = t.lora_target_modules
        if not (isinstance(targets, str) and targets) and not (
                isinstance(targets, list) and targets and all(isinstance(x, str) and x for x in targets)):
            p.append(f"lora_target_modules={targets!r}: give 'all-linear' or a list of module names "
                     "such as ['q_proj', 'v_proj'].")
        if t.lora_export not in ("adapter", "merged"):
            p.append(f"lora_export={t.lora_export!r}: use 'adapter' (PEFT adapter) or 'merged' (a full model).")
        positive_int("seed", t.seed, minimum=0)
        number("eval_fraction", t.eval_fraction, 0, 0.5)
        positive_int("num_workers", t.num_workers)
        boolean("use_gpu", t.use_gpu)
        number("cpus_per_worker", t.cpus_per_worker, 0, None)
        number("gpus_per_worker", t.gpus_per_worker, 0, None, lo_open=True)
        positive_int("max_failures", t.max_failures, minimum=0)
        boolean("trust_remote_code", t.trust_remote_code)

        if not isinstance(r.storage_path, str) or not r.storage_path:
            p.append(f"storage_path={r.storage_path!r}: give a folder or a cloud URI (s3://..., gs://...).")
        if r.run_name is not None and (not isinstance(r.run_name, str) or not r.run_name
                                       or "/" in r.run_name or r.run_name.startswith(".")):
            p.append(f"run_name={r.run_name!r}: use a plain folder name (no '/', not starting with '.').")
        elif r.run_name == "traces":
            p.append("run_name='traces': that folder holds the teacher traces of every run; choose another name.")
        if r.ray_address is not None and not isinstance(r.ray_address, str):
            p.append(f"ray_address={r.ray_address!r}: give an address such as 'auto' or 'ray://host:10001'.")
        positive_int("max_tokens", i.max_tokens)
        positive_int("generate_batch_size", i.generate_batch_size)
        if i.device is not None and (not isinstance(i.device, str) or not i.device.startswith(("cpu", "cuda"))):
            p.append(f"device={i.device!r}: use 'cpu', 'cuda' or 'cuda:N', or None to pick automatically.")
        boolean("evaluate", i.evaluate)
        return p


def unknown_option_problems(options: dict[str, Any]) -> list[str]:
    problems = []
    for name in options:
        if name not in FIELD_OWNER:
            close = difflib.get_close_matches(name, FIELD_OWNER, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append(f"unknown option {name!r}.{hint} Known options: {', '.join(sorted(FIELD_OWNER))}.")
    return problems
