"""A DSPy finetuning provider backed by bootfinetune: `dspy.LM(...).finetune(...)` on Ray Train + DeepSpeed.

    provider = RayFinetuneProvider(storage_path="runs", num_workers=2, zero_stage=3)
    lm = dspy.LM("openai/local:/models/tiny-llama", provider=provider)
    job = lm.finetune(train_data, "chat", {"epochs": 2, "lr": 3e-4, "bsize": 8})
    tuned = job.result()            # a dspy.LM on the export, already served on 127.0.0.1
    tuned("Hello")

DSPy's own optimizers (`dspy.BootstrapFinetune`, BetterTogether) reach it the same way:
give the student's predictors such an LM. What happens:

- `lm.finetune` checks the data (chat rows ending with an assistant message), the base
  model directory and `train_kwargs` before a thread starts, so mistakes raise at once.
- `finetune` writes the rows to `{storage_path}/Provider-{hash}/data/all.jsonl` and trains
  them with `finetune.finetune_models` (one key, "all"). The run name hashes the base
  model, the data and the training options, so the same call again finds the finished
  model and returns it without training (an interrupted one resumes from its checkpoint).
- The model id returned is `openai/bootfinetune:{run}/models/all`. The job's `result()`
  is that LM launched: a `serve.ModelServer` answers it over HTTP (one per directory and
  process), with `api_base` pointing there and a placeholder local `api_key`.
- A failed job raises from `job.result()` (DSPy's own jobs hand the error back as a value).

DSPy keeps `provider` out of an LM's saved state: after `program.load(...)`, set it again
(`lm.provider = RayFinetuneProvider(...)`) and `lm.launch()`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat, TrainingStatus

from bootfinetune.pipeline import finetune_and_rebind
from bootfinetune.common.suggestions import did_you_mean
from bootfinetune.dspy_api import translate_train_kwargs
from bootfinetune.common.chat import LOCAL_API_KEY, ROLES, ends_with_answer, first_bad_message
from bootfinetune.config import FIELD_OWNER, Config, RunOptions, TrainConfig, identity_options
from bootfinetune.errors import ConfigError, TrainDataError
from bootfinetune.stages.finetune_job import FinetuneJob
from bootfinetune.run.jsonio import fingerprint
from bootfinetune.run.rundir import RunDir, run_name_for
from bootfinetune.run.runfiles import ModelManifest, RunDescription
from bootfinetune.run.writer import writer_for
from bootfinetune.common.targets import check_target, finetuned_model_id, model_path
from bootfinetune.serving.serve import serve_model, stop_model

log = logging.getLogger(__name__)

MODEL_KEY = "all"
"""The model key a provider run trains (one model per call)."""
PREDICTOR = "lm"
"""The predictor name written into each data row (DSPy hands rows without one)."""

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"target"}
_SERVE_OPTIONS = {"max_tokens", "max_tokens_ceiling", "generate_batch_size", "device"}
PROVIDER_OPTIONS = _TRAIN_FIELDS | {f.name for f in dataclasses.fields(RunOptions)} | _SERVE_OPTIONS
"""Options a provider takes: how to train, where runs go, and how launched models generate."""
_LAUNCH_OPTIONS = {"host", "port", "device", "max_tokens", "max_tokens_ceiling", "batch_size", "trust_remote_code",
                   "request_timeout", "api_key", "insecure"}


def resolve_base_model(model: str) -> str:
    """The base model to train: an absolute directory when it is a local one, else the hub id as given.

    Raises:
        ConfigError: a directory that does not exist or holds no model config.
    """
    name = model_path(model)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(f"model {model!r}: {path} has no config.json; point the LM at a Hugging Face "
                              f"model directory (what save_pretrained writes).")
        return str(path.resolve())
    looks_like_path = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or path.exists()
    if not name or looks_like_path:
        raise ConfigError(f"model {model!r}: no model directory at {str(path) or '(empty)'}; create the LM as "
                          f"dspy.LM('openai/local:<model dir>', provider=...) with a directory that exists "
                          f"(or a Hugging Face hub id).")
    return name  # a hub id: from_pretrained fetches it when training starts


def check_train_data(train_data: Any, train_data_format: Any) -> None:
    """Chat format, and rows of `{"messages": [...]}` ending with the assistant's answer.

    Raises:
        TrainDataError: listing the first few bad rows, each with the field and the fix.
    """
    if train_data_format != TrainDataFormat.CHAT:  # TrainDataFormat is a str enum: "chat" matches too
        raise TrainDataError([f"train_data_format={train_data_format!r}: RayFinetuneProvider trains chat data "
                              f"only; pass 'chat' (TrainDataFormat.CHAT) with rows of "
                              f"{{'messages': [...]}} (ChatAdapter.format_finetune_data writes them)."])
    if not isinstance(train_data, (list, tuple)) or not train_data:
        raise TrainDataError([f"train_data: expected a non-empty list of {{'messages': [...]}} rows, got "
                              f"{type(train_data).__name__} of length {_length(train_data)}."])
    problems: list[str] = []
    for i, row in enumerate(train_data):
        problem = _row_problem(row)
        if problem:
            problems.append(f"train_data[{i}]: {problem}")
        if len(problems) == 5:
            problems.append("train_data: more rows may have problems; fix the ones above first.")
            break
    if problems:
        raise TrainDataError(problems)


def _length(value: Any) -> Any:
    return len(value) if hasattr(value, "__len__") else "?"


def _row_problem(row: Any) -> str | None:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list):
        return (f"needs a 'messages' list (got {type(row).__name__} with keys {sorted(row)[:5]})"
                if isinstance(row, dict) else f"expected a dict with 'messages', got {type(row).__name__}") + "."
    j = first_bad_message(messages, roles=ROLES)
    if j is not None:
        return (f"messages[{j}] must be {{'role': 'system'|'user'|'assistant', 'content': str}}; "
                f"got {str(messages[j])[:120]}.")
    if not ends_with_answer(messages):
        return (f"'messages' must end with an assistant message (the answer to learn) after the prompt; "
                f"got roles {[m['role'] for m in messages]}. Append {{'role': 'assistant', 'content': answer}}.")
    return None


def train_options(options: dict[str, Any], train_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Provider options with `train_kwargs` on top, as flat `Config` options.

    `train_kwargs` takes DSPy 2.4 names (bsize, accumsteps, lr, epochs, bf16), DSPy 3.x / TRL
    names (learning_rate, num_train_epochs, ...) and bootfinetune's own training options
    (zero_stage, num_workers, ...). Unknown names raise.
    """
    kwargs = dict(train_kwargs or {})
    direct = {k: v for k, v in kwargs.items() if k in _TRAIN_FIELDS}
    translated = translate_train_kwargs({k: v for k, v in kwargs.items() if k not in direct})
    return {**options, **translated, **direct}


class RayTrainingJob(TrainingJob):
    """A finetuning job (a `Future`). `result()` is the finetuned `dspy.LM`, launched; a failure raises.

    The data, the model and `train_kwargs` are checked as the job is made, in the caller's
    thread, so `lm.finetune(...)` itself raises on bad input. `run_dir` is the run directory
    once training has started; `manifest` the model's manifest once it is done.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        check_train_data(self.train_data, self.train_data_format)
        resolve_base_model(self.model or "")
        Config.from_options(**train_options({}, self.train_kwargs))
        self.run_dir: Path | None = None
        self.manifest: dict[str, Any] | None = None  # models/all/manifest.json's dict, as the file holds it

    def status(self) -> TrainingStatus:
        if self.cancelled():
            return TrainingStatus.cancelled
        if not self.done():
            return TrainingStatus.running if self.run_dir is not None else TrainingStatus.pending
        return TrainingStatus.failed if self.exception() is not None else TrainingStatus.succeeded

    def set_result(self, result: Any) -> None:
        """DSPy hands over the finetuned LM, or the exception: launch the first, raise the second."""
        if isinstance(result, BaseException):
            self.set_exception(result)
            return
        try:
            result.launch()
        except Exception as exc:  # the model trained but cannot be served: the job fails with why
            self.set_exception(exc)
            return
        super().set_result(result)


class RayFinetuneProvider(Provider):
    """Finetunes with bootfinetune (Ray Train + DeepSpeed) and serves results on a local HTTP endpoint.

    Args:
        **options: bootfinetune options: training (`num_workers`, `zero_stage`, `use_gpu`,
            `max_length`, `bsize`, `lr`, ...: defaults that `train_kwargs` override), where runs
            go (`storage_path`, `run_name`, `ray_address`) and how launched models generate
            (`max_tokens`, `max_tokens_ceiling`, `generate_batch_size`, `device`).

    Raises:
        ConfigError: listing every unknown or bad option.
    """

    def __init__(self, **options: Any):
        super().__init__()
        self.finetunable = True
        self.TrainingJob = RayTrainingJob
        problems = [_option_problem(name) for name in options if name not in PROVIDER_OPTIONS]
        try:
            self._config = Config.from_options(**{k: v for k, v in options.items() if k in PROVIDER_OPTIONS})
        except ConfigError as exc:
            problems += exc.problems
        if problems:
            raise ConfigError(problems)
        self.options = dict(options)  # as given, for repr; self._config is what they make, checked

    def __repr__(self) -> str:
        return f"RayFinetuneProvider({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    def config(self, model: str, train_kwargs: dict[str, Any] | None = None) -> Config:
        """The checked configuration training `model` with these `train_kwargs` would use."""
        return self._config.replace(**train_options({}, train_kwargs), target=resolve_base_model(model))

    # -- DSPy's interface -------------------------------------------------------------------
    def finetune(self, job: TrainingJob | None, model: str, train_data: list[dict[str, Any]],
                 train_data_format: TrainDataFormat | str | None,
                 train_kwargs: dict[str, Any] | None = None) -> str:
        """Trains `model` on `train_data` and returns the finetuned model's DSPy id.

        Args:
            job: The DSPy job tracking this call (its `run_dir` and `manifest` are filled in), or None.
            model: The base model's DSPy string, e.g. "openai/local:/models/tiny".
            train_data: Rows of `{"messages": [..., {"role": "assistant", ...}]}`.
            train_data_format: "chat".
            train_kwargs: Training options (see `train_options`).

        Raises:
            TrainDataError, ConfigError: before any training. FinetuneError: training failed.
        """
        check_train_data(train_data, train_data_format)
        config = self.config(model, train_kwargs)
        problem = check_target(config.train.target, config.train.trust_remote_code)
        if problem:  # a broken directory or an unreachable hub id fails before Ray and DeepSpeed start
            raise ConfigError(problem)
        run = self.run_dir(config, train_data)
        if isinstance(job, RayTrainingJob):
            job.run_dir = run.root
        # The same call from two threads trains once (the second finds the manifest); from another process
        # it meets the run's writer lock (RunBusyError naming this one, or a wait with writer_wait_s).
        with _run_lock(run), writer_for(run, config.run, "lm.finetune"):
            manifest = _train(run, config, train_data)
        if isinstance(job, RayTrainingJob):
            job.manifest = manifest.to_json()
        return finetuned_model_id(run.model_dir(MODEL_KEY))

    def run_dir(self, config: Config, train_data: list[dict[str, Any]]) -> RunDir:
        """`{storage_path}/Provider-{hash of base model, data and training options}` (or `run_name`)."""
        if config.run.run_name:
            return RunDir.at(config.run.storage_path, config.run.run_name)
        options = identity_options(config, "train")  # resource options are left out of the run name
        identity = {"model": config.train.target, "data": fingerprint([row["messages"] for row in train_data]),
                    "options": options}
        return RunDir.at(config.run.storage_path, run_name_for("Provider", identity))

    def launch(self, lm: Any, launch_kwargs: dict[str, Any] | None = None) -> None:
        """Serves the LM's model on 127.0.0.1 (once per directory and process) and points the LM there.

        Calling it again, or for another LM on the same model, reuses the running server.
        `launch_kwargs` (or `lm.launch_kwargs`) may set host, port, device, max_tokens,
        max_tokens_ceiling, batch_size, trust_remote_code, request_timeout, api_key (the key the server asks
        for and the LM sends; needed off loopback) and insecure (serve off loopback without one).
        """
        inference = self._config.inference
        options = {"max_tokens": inference.max_tokens, "max_tokens_ceiling": inference.max_tokens_ceiling,
                   "batch_size": inference.generate_batch_size,
                   "device": inference.device, "trust_remote_code": self._config.train.trust_remote_code}
        given = dict(launch_kwargs or getattr(lm, "launch_kwargs", None) or {})
        unknown = sorted(set(given) - _LAUNCH_OPTIONS)
        if unknown:
            raise ConfigError(f"launch_kwargs: unknown key(s) {unknown}; known: {sorted(_LAUNCH_OPTIONS)}.")
        server = serve_model(resolve_base_model(lm.model), **{**options, **given})
        lm.kwargs["api_base"] = server.url
        lm.kwargs["api_key"] = given.get("api_key") or LOCAL_API_KEY

    def kill(self, lm: Any, launch_kwargs: dict[str, Any] | None = None) -> None:
        """Stops the server of the LM's model (if one runs) and frees its weights; calls fail until launch."""
        try:
            model = resolve_base_model(lm.model)
        except ConfigError:
            return  # nothing of ours can be serving a model that does not exist
        stop_model(model)


_RUN_LOCKS: dict[Path, threading.Lock] = {}
_RUN_LOCKS_GUARD = threading.Lock()


def _run_lock(run: RunDir) -> threading.Lock:
    with _RUN_LOCKS_GUARD:
        return _RUN_LOCKS.setdefault(run.root, threading.Lock())


def _train(run: RunDir, config: Config, train_data: list[dict[str, Any]]) -> ModelManifest:
    """Writes the data and config.json, trains key "all" (or finds it trained), and returns its manifest."""
    rows = [{"messages": row["messages"], "predictor": PREDICTOR, "example_index": i}
            for i, row in enumerate(train_data)]
    run.write_data(MODEL_KEY, rows)
    options = config.to_dict()
    description = RunDescription(options={"train": options["train"], "run": options["run"]}, predictors=[PREDICTOR],
                               model_keys={MODEL_KEY: {"target": config.train.target, "predictors": [PREDICTOR]}},
                               provider=RayFinetuneProvider.__name__, base_model=config.train.target,
                               train_data_format="chat", records=len(rows))
    run.write_description(description)
    job = FinetuneJob(key=MODEL_KEY, target=config.train.target, predictors=(PREDICTOR,),
                      train_file=run.data_file(MODEL_KEY))
    manifest = finetune_and_rebind(run, config, description, [job], to_stage="finetune").manifests[MODEL_KEY]
    log.info("model %s finetuned on %d rows: %s", config.train.target, len(rows), run.model_dir(MODEL_KEY))
    return manifest


def _option_problem(name: str) -> str:
    if name in FIELD_OWNER:
        return (f"{name!r} is a {FIELD_OWNER[name]} option of the compiler; a provider is handed finished "
                f"training data and trains the model its LM names, so drop {name!r}.")
    return f"unknown option {name!r}.{did_you_mean(name, PROVIDER_OPTIONS)} Provider options: {', '.join(sorted(PROVIDER_OPTIONS))}."
