"""The run directory's files as typed records: config.json, the bootstrap and data summaries,
each model's manifest.json, and report.json.

Each record is a dataclass with `to_json()` (the dict written to the file) and
`from_json(data, source)` (the dict read back). Every file carries `version`
(`RUN_FILES_VERSION`); a file without one was written before records had versions and
is read as version 0 (the same fields, some of them missing: they take their defaults).
A file from a newer bootfinetune raises `RunFileError` naming the file and the fix.
Keys config.json, a manifest or the report holds that their record does not know are kept
(`extra`) and written back, so nothing is lost.

This module depends on nothing of ours but `errors`, `common.redaction` and `config` (which checks recorded
options as strictly as given ones): it reads JSON with the standard library, and the run directory
(`rundir.RunDir`) writes the records' dicts atomically.

    >>> ModelManifest.from_json({"key": "all", "best_epoch": 2}, "manifest.json").best_epoch
    2
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bootfinetune.common.redaction import redact_urls_deep
from bootfinetune.config import Config, InferenceConfig
from bootfinetune.errors import ConfigError

log = logging.getLogger(__name__)

RUN_FILES_VERSION = 2
"""The version every run file is written with; files up to it are read.
2: config.json's `folders` and a manifest's `folder` (a model key's folder name, `common.names`)."""

_R = TypeVar("_R")


class RunFileError(ConfigError):
    """A run-directory file this bootfinetune cannot read (a newer version, or not a JSON object)."""


def _fields(cls: type, data: Any, source: Any) -> dict[str, Any]:
    """The record's constructor arguments from a file's dict, after checking its version; the keys it
    does not know go to `extra` where the record keeps them."""
    name = getattr(cls, "FILE", cls.__name__)
    if not isinstance(data, dict):
        raise RunFileError(f"{source}: a {name} must hold a JSON object, not {type(data).__name__}; the file is "
                           f"damaged: run the stage that writes it again (compile again into this run directory).")
    version = data.get("version", 0)
    if not isinstance(version, int) or version > RUN_FILES_VERSION:
        raise RunFileError(f"{source}: {name} version {version!r} was written by a newer bootfinetune (this one "
                           f"reads versions up to {RUN_FILES_VERSION}); upgrade bootfinetune "
                           f"from where you installed it (a checkout: git pull, then pip install -e .) or "
                           f"compile again into a new run directory.")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    if any(f.name == "extra" for f in dataclasses.fields(cls)):
        known["extra"] = {k: v for k, v in data.items() if k not in names and k != "version"}
    return known


def _to_json(record: Any) -> dict[str, Any]:
    """`version` first, then the fields in their declared order, then the keys kept from the file."""
    out: dict[str, Any] = {"version": RUN_FILES_VERSION}
    for f in dataclasses.fields(record):
        if f.name != "extra":
            out[f.name] = _plain(getattr(record, f.name))
    out.update(getattr(record, "extra", {}))
    return out


def _plain(value: Any) -> Any:
    """Nested dataclasses (summaries inside the report) as dicts; everything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_record(cls: type[_R], path: str | Path) -> _R:
    """The record `cls` read from the JSON file at `path` (see `from_json`)."""
    return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")), path)  # type: ignore[attr-defined]


@dataclass
class RunDescription:
    """config.json: the resolved options and what the run trains; never an API key.

    One record for both writers: a compile fills the program's fields, a provider run
    (`RayFinetuneProvider`) the provider's; each leaves the other's at None.
    """

    FILE = "config.json"

    program_class: str | None = None
    """`module:QualName` of the compiled program's class (`bootfinetune.load` imports it); None for a provider run."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The resolved options per `Config` group ({"train": {...}, "run": {...}, ...})."""
    predictors: list[str] = field(default_factory=list)
    """Predictor names, in the program's order."""
    model_keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Model key -> {"target": base model, "predictors": [names it serves]}."""
    folders: dict[str, str] = field(default_factory=dict)
    """Model key -> its folder under data/, models/ and checkpoints/ (`common.names.folder_names`); readers use
    this, never the key. Empty in runs before version 2, whose folders were the keys."""
    teachers: list[dict[str, Any]] = field(default_factory=list)
    """Per teacher: predictor name -> its LM's identity."""
    teacher_settings_lm: dict[str, Any] | None = None
    """The identity of teacher_settings["lm"], if any."""
    driver_lm: dict[str, Any] | None = None
    """The identity of dspy.settings.lm when the run started."""
    metric: Any = None
    """The metric's identity."""
    adapter: dict[str, Any] | None = None
    """The DSPy adapter as `adapters.adapter_spec` records it."""
    inputs: dict[str, Any] | None = None
    """What the run name hashes (`rundir.run_name_of`); None in runs made before it was recorded."""
    trace_store: str | None = None
    """Where the run's teacher traces are kept."""
    provider: str | None = None
    """The provider class that made the run (`RayFinetuneProvider`); None for a compile."""
    base_model: str | None = None
    """A provider run's base model."""
    train_data_format: str | None = None
    """A provider run's data format ("chat")."""
    records: int | None = None
    """A provider run's number of training rows."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of the file this record does not know (kept, written back)."""

    @classmethod
    def from_json(cls, data: Any, source: Any = FILE) -> "RunDescription":
        return cls(**_fields(cls, data, source))

    def to_json(self) -> dict[str, Any]:
        """The dict config.json holds: every URL and URI in it without credentials (`redact_urls_in`), whoever
        filled the record (a compile's shown options, a provider's or a retrain's as given). The record
        itself keeps what it was given; `rundir.RunDir.write_description` is the one writer of the file."""
        return redact_urls_deep(_to_json(self))

    def flat_options(self) -> dict[str, Any]:
        """Every recorded option in one dict (`Config.from_options` takes it), but `mlflow_tracking_uri` and
        `ray_address`: recorded redacted, the first is not reused (each entry is given its own, or MLflow's
        environment), and a run's recorded address never decides where a later process connects (the
        caller's argument, then $RAY_ADDRESS, do)."""
        return {k: v for group in self.options.values() for k, v in group.items()
                if k not in ("mlflow_tracking_uri", "ray_address")}

    def trusts_remote_code(self, given: bool | None = None) -> bool:
        """Whether the run's models may run their own code as they load: only when the caller says so (`given` is
        True). A run directory never widens what its reader allowed; what it recorded is `recorded_remote_code`."""
        return given is True

    def recorded_remote_code(self, source: Any = FILE) -> bool:
        """The `trust_remote_code` the run was trained with (False if unrecorded); anything but a JSON bool
        (a hand-written "false") is a `RunFileError` naming the file."""
        value = self.options.get("train", {}).get("trust_remote_code", False)
        if not isinstance(value, bool):
            raise RunFileError(f"{source}: trust_remote_code={value!r} must be true or false; the file was changed "
                               f"by hand or is damaged: fix it, or compile again into a new run directory.")
        return value

    def inference_config(self, source: Any = FILE, **given: Any) -> InferenceConfig:
        """The recorded inference options with `given` (not None) on top, checked as strictly as options a caller
        gives (`Config`); a recorded value of the wrong type or range is a `RunFileError` naming the file."""
        known = {f.name for f in dataclasses.fields(InferenceConfig)}
        recorded = {k: v for k, v in self.options.get("inference", {}).items() if k in known}
        try:
            Config.from_options(**recorded)
        except ConfigError as e:
            raise RunFileError([f"{source}: {p}" for p in e.problems]) from None
        return Config.from_options(**{**recorded, **{k: v for k, v in given.items() if v is not None}}).inference

    def key_of(self) -> dict[str, str]:
        """Predictor name -> the model key serving it."""
        return {name: key for key, spec in self.model_keys.items() for name in spec["predictors"]}


def warn_untrusted(description: RunDescription, trusted: bool, source: Any) -> None:
    """Says (a warning) that a run trained with `trust_remote_code=True` is read without it, as the caller did not
    pass it: its models may then fail to load, and the fix is the caller's to make."""
    if description.recorded_remote_code(source) and not trusted:
        log.warning("%s: the run was trained with trust_remote_code=True; its models load without their own code "
                    "unless you pass trust_remote_code=True (--trust-remote-code), if you trust the run directory.",
                    source)


@dataclass
class BootstrapSummary:
    """What one bootstrap run did; saved as bootstrap/{split}.summary.json when it is done."""

    FILE = "bootstrap summary"

    examples: int = 0
    """Examples run (per split)."""
    kept: int = 0
    """Examples whose trace passed the metric."""
    failed: int = 0
    """Examples that raised."""
    rejected: int = 0
    """Examples that ran but whose trace the metric did not keep (examples = kept + rejected + failed)."""
    calls: int = 0
    """Predictor calls recorded."""
    teacher_calls: int = 0
    """Calls the teacher's LM answered for this run (cache hits excluded); 0 for reused traces."""
    reused: int = 0
    """Examples whose traces were read from the trace store instead of asking the teacher."""
    unattributed: int = 0
    """Trace steps from predictors that are not among the program's named predictors (dropped)."""
    seconds: float = 0.0
    """Wall time of the stage."""
    per_predictor: dict[str, int] = field(default_factory=dict)
    """Kept calls per predictor name."""
    nodes: dict[str, int] = field(default_factory=dict)
    """Examples run per Ray node id (where the bootstrap actors ran)."""
    engine: str = ""
    """How the actors ran the teacher programs: "async", "threads" (one per teacher, joined by "+"); "" if none ran."""
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Teacher usage of this run by model: {"calls", "prompt_tokens", "completion_tokens", "cost_usd"}, as DSPy
    reported it; `cost_usd` is None where DSPy knows no price for the model. Reused traces cost nothing."""

    @classmethod
    def from_json(cls, data: Any, source: Any = FILE) -> "BootstrapSummary":
        return cls(**_fields(cls, data, source))

    def to_json(self) -> dict[str, Any]:
        """The summary file's dict (with `version`); report.json holds `dataclasses.asdict` of it."""
        return _to_json(self)


@dataclass
class DataSummary:
    """What went into one model key's finetuning file (report.json's stages.data.keys[key])."""

    key: str
    """The model key ("all" or a predictor name)."""
    predictors: list[str]
    """Predictors this key's model serves."""
    records: int = 0
    """Records written."""
    duplicates: int = 0
    """Records identical to an earlier one."""
    duplicates_dropped: int = 0
    """Identical records dropped (kept once)."""
    unformattable: int = 0
    """Kept calls the adapter could not format (missing output fields); dropped."""
    unparseable: int = 0
    """Kept calls whose formatted answer the adapter does not parse back to the teacher's outputs; dropped."""
    per_predictor: dict[str, int] = field(default_factory=dict)
    """Records written per predictor."""
    path: str = ""
    """Where the file is."""


@dataclass
class ModelManifest:
    """models/{key}/manifest.json: what a finished model was trained on and how it went (written last)."""

    FILE = "manifest.json"

    key: str = ""
    """The model key."""
    target: str = ""
    """The base model it was trained from."""
    predictors: list[str] = field(default_factory=list)
    """Predictors it serves."""
    folder: str = ""
    """Its folder under models/ (config.json's `folders`); "" in manifests before version 2 (the key)."""
    model_kind: str = ""
    """"causal" or "seq2seq"."""
    renderer: dict[str, Any] = field(default_factory=dict)
    """How chat messages became model input (`render.renderer_identity`)."""
    data_file: str = ""
    """The training data file."""
    data_hash: str = ""
    """sha256 of the training data file."""
    eval_hash: str | None = None
    """sha256 of the eval data file, None when eval came from the training data."""
    train_records: int = 0
    """Records trained on."""
    eval_records: int = 0
    """Records evaluated on."""
    eval_source: str = ""
    """"valset", "held_out" or "none"."""
    epochs: int = 0
    """Epochs asked for."""
    losses: dict[str, list] = field(default_factory=lambda: {"train": [], "eval": []})
    """Per epoch: {"train": [...], "eval": [...]}."""
    eval_loss_before: float | None = None
    """Eval loss of the base model, before training."""
    best_epoch: int = 0
    """The epoch exported (lowest eval loss; the last without eval data)."""
    best_eval_loss: float | None = None
    """Its eval loss."""
    tokens_seen: dict[str, int] = field(default_factory=dict)
    """{"answer", "total", "padding"} tokens over all epochs."""
    seconds: float = 0.0
    """Training time the workers measured."""
    wall_seconds: float = 0.0
    """Wall time of the model's share of its Ray Train run (`started_at` to `finished_at`), export included."""
    started_at: float = 0.0
    """Unix time its share of the run began: the run's start for the run's first model, else the previous
    model's end (several models share a run: `stages.train_runs`)."""
    finished_at: float = 0.0
    """Unix time its share ended: when the next model of the run started, or the run returned; the export follows."""
    truncated: dict[str, Any] = field(default_factory=dict)
    """Records cut to max_length ({"train", "eval"}), max_length, and the prompt length inference keeps."""
    answer_tokens_max: int | None = None
    """The longest answer trained on (tokens with labels, after cutting to max_length); serving
    derives its max_tokens ceiling from it (`serving.lm.token_ceiling`). None in runs from before it."""
    dropped_per_epoch: Any = None
    """Records dropped per epoch to even out the workers' batches."""
    world_size: int = 0
    """Training workers."""
    engine: dict[str, Any] = field(default_factory=dict)
    """The engine trained with and why: engine ("torch": the plain one, or "deepspeed"), zero_stage,
    offload_optimizer, offload_params, reason, estimate_bytes (model states per worker), memory_bytes (memory
    per worker), gradient checkpointing and packing; see `zero_stage`."""
    timings: dict[str, float] = field(default_factory=dict)
    """Where the job's seconds went: fit_seconds (its share of Ray Train's fit), and within it
    ray_train_start_seconds (from the share's start to the loop's: Ray Train's start for a run's first model),
    setup_seconds (data, model, DeepSpeed), train_seconds (the steps), eval_seconds (the eval passes),
    checkpoint_seconds (all checkpoints but the last) and ray_train_end_seconds (the last checkpoint's writing and
    report, then the next model's start or Ray Train's teardown); then export_seconds."""
    nodes: list = field(default_factory=list)
    """The Ray node of each rank."""
    export_node: str | None = None
    """The Ray node that wrote the Hugging Face export (its model loaded there)."""
    starts: list[dict[str, int]] = field(default_factory=list)
    """Where each (re)start of the training began ({"epoch", "global_step"})."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Per epoch: losses, steps, tokens."""
    loss_curve: list = field(default_factory=list)
    """Train loss over steps."""
    checkpoint: str = ""
    """The checkpoint exported (`checkpoints/{folder}/epoch_{NNN}`, a path or a URI without credentials)."""
    train_config: dict[str, Any] = field(default_factory=dict)
    """The `TrainConfig` it was trained with."""
    lora: dict[str, Any] | None = None
    """The LoRA adapter's facts, None for a full finetune."""
    added_tokens: list[str] = field(default_factory=list)
    """Tokens added to the tokenizer so every answer survives it."""
    job_fingerprint: str = ""
    """What the model was trained on (target, data, options): a rerun with the same one is not retrained."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of the file this record does not know (kept, written back)."""

    @classmethod
    def from_json(cls, data: Any, source: Any = FILE) -> "ModelManifest":
        return cls(**_fields(cls, data, source))

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    def prompt_max_length(self) -> int | None:
        """The prompt length inference keeps (training's room beside a typical answer), if recorded."""
        return self.truncated.get("prompt_max_length") or self.truncated.get("max_length")

    def summary(self) -> dict[str, Any]:
        """The report's view of the model (report.json's stages.finetune[key])."""
        return {"seconds": self.seconds, "tokens": self.tokens_seen["total"],
                "answer_tokens": self.tokens_seen["answer"], "train_loss": self.losses["train"],
                "eval_loss": self.losses["eval"], "best_epoch": self.best_epoch,
                "eval_loss_before": self.eval_loss_before, "loss_curve": self.loss_curve,
                "steps_per_epoch": (self.history or [{}])[0].get("steps"), "truncated": self.truncated}


@dataclass
class JobStamp:
    """checkpoints/{folder}/bootfinetune_job.json: what the checkpoints there were trained on (a mismatch starts
    the key over). The file holds no `version`."""

    FILE = "bootfinetune_job.json"

    job_fingerprint: str = ""
    """The job's fingerprint (`stages.fingerprints.job_fingerprint`)."""
    key: str = ""
    """The model key."""
    target: str = ""
    """The base model."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of the file this record does not know (kept, written back)."""

    @classmethod
    def from_json(cls, data: Any, source: Any = FILE) -> "JobStamp":
        return cls(**_fields(cls, data, source))

    def to_json(self) -> dict[str, Any]:
        out = _to_json(self)
        out.pop("version")
        return out


@dataclass
class RunReport:
    """report.json: counts, losses, metrics, time and tokens per stage.

    `stages` holds one section per stage ("bootstrap", "data", "finetune", "evaluate"),
    each written by that stage; `merge` adds sections as stages finish.
    """

    FILE = "report.json"

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per stage: its figures (the bootstrap summary, the data summaries, each model's summary, seconds)."""
    metric: dict[str, Any] | None = None
    """The metric on the valset: {"before", "after", "teacher", "examples"}; None before evaluation."""
    retrained_from: str | None = None
    """The run whose traces a retrain trained again, if this run is a retrain's."""
    evaluations: dict[str, str] = field(default_factory=dict)
    """Evaluation name -> its file under evaluations/ (a safe name, `common.names.safe_name`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other top-level keys (kept, written back)."""

    @classmethod
    def from_json(cls, data: Any, source: Any = FILE) -> "RunReport":
        return cls(**_fields(cls, data, source))

    def to_json(self) -> dict[str, Any]:
        """The file's dict; metric, retrained_from and evaluations are left out while unset, as before records."""
        out = _to_json(self)
        for name, unset in (("metric", None), ("retrained_from", None), ("evaluations", {})):
            if out[name] == unset:
                out.pop(name)
        return out

    def merge(self, **sections: Any) -> "RunReport":
        """Sets top-level sections; a dict merges one level deep into the one there."""
        for name, value in sections.items():
            known = name in ("stages", "metric", "retrained_from", "evaluations")
            current = getattr(self, name) if known else self.extra.get(name)
            if isinstance(value, dict) and isinstance(current, dict):
                value = {**current, **_plain(value)}
            if known:
                setattr(self, name, value)
            else:
                self.extra[name] = value
        return self

    def data_tokens(self, key: str) -> tuple[str, ...] | None:
        """The tokens a key's data stage added (stages.data.tokens[key]), None where the run has no record of them."""
        plan = self.stages.get("data", {}).get("tokens", {}).get(key)
        if not plan or plan.get("added_tokens") is None:
            return None
        return tuple(plan["added_tokens"])


__all__ = ["RUN_FILES_VERSION", "RunFileError", "RunDescription", "BootstrapSummary", "DataSummary",
           "ModelManifest", "JobStamp", "RunReport", "read_record", "warn_untrusted"]
