"""Stage 5: a new program whose predictors call their finetuned models; and loading one back.

`rebind` never touches the student: it deep-copies it and sets each predictor's `lm` to
the `FinetunedLM` of its model key, a `dspy.LM` whose engine runs that model (one shared
object in multitask mode), and makes every predictor use the adapter the models were trained
with (`adapters.scope_adapter`).
`load(run_dir)` rebuilds the compiled program from a run directory alone, adapter included
(config.json records it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

from bootfinetune.stages.adapters import adapter_from_spec, scope_adapter
from bootfinetune.common.chat import LOCAL_API_KEY
from bootfinetune.common.redaction import public_lm_state
from bootfinetune.stages.checks import ProgramPlan
from bootfinetune.config import Config, InferenceConfig
from bootfinetune.errors import ProgramError
from bootfinetune.common.importpath import resolve
from bootfinetune.run.jsonio import read_jsonl
from bootfinetune.serving.auth import key_from
from bootfinetune.serving.limits import token_ceiling
from bootfinetune.serving.lm import FinetunedLM
from bootfinetune.training.answer_tokens import add_answer_tokens
from bootfinetune.training.render import answer_token_counts, encode_records, model_kind
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import RunDescription, warn_untrusted


@dataclass(frozen=True)
class ScoringLimits:
    """How a base (not finetuned) model answers while it is scored: as its finetuned self will."""

    max_tokens_ceiling: int
    """Most new tokens an answer may have: `token_ceiling` of the longest training answer."""
    max_length: int | None
    """Prompt tokens kept: training's max_length less a typical answer (causal), as the manifest records."""


def rebind(student: dspy.Module, key_of: dict[str, str], model_of: dict[str, str], *,
           exclude_demos: bool = False, inference: InferenceConfig | None = None,
           sources: dict[str, str | None] | None = None, adapter: Any = None,
           trust_remote_code: bool = False, limits: dict[str, ScoringLimits] | None = None) -> dspy.Module:
    """A copy of `student` whose predictor `name` calls `FinetunedLM(model_of[key_of[name]])`.

    Args:
        student: The program; left untouched.
        key_of: Predictor name -> model key.
        model_of: Model key -> model directory (or hub id, for the base student).
        exclude_demos: Drop the predictors' demos, as training did.
        inference: Generation options for the LMs.
        sources: Model key -> the model's cloud URI, for runs on cloud storage (see `FinetunedLM`).
        adapter: The DSPy adapter the models were trained with; every predictor formats its
            prompts with it whatever `dspy.settings.adapter` says. None leaves the setting in charge.
        trust_remote_code: Let the models' own code run when they load (the run's `trust_remote_code`).
        limits: Model key -> the ceiling and prompt length its LM keeps, for models without a manifest that
            records them (base targets: `base_limits`).
    """
    inference, limits = inference or InferenceConfig(), limits or {}
    lms = {key: FinetunedLM(str(path), key=key, device=inference.device, max_tokens=inference.max_tokens,
                            max_tokens_ceiling=limits[key].max_tokens_ceiling if key in limits
                            else inference.max_tokens_ceiling,
                            max_length=limits[key].max_length if key in limits else None,
                            batch_size=inference.generate_batch_size, source=(sources or {}).get(key),
                            trust_remote_code=trust_remote_code)
           for key, path in model_of.items()}
    compiled = student.deepcopy()
    for name, predictor in compiled.named_predictors():
        predictor.lm = lms[key_of[name]]
        if exclude_demos:
            predictor.demos = []
    if adapter is not None:
        scope_adapter(compiled, adapter)
    compiled._compiled = True
    return compiled


def base_program(student: dspy.Module, plan: ProgramPlan, *, exclude_demos: bool,
                 inference: InferenceConfig, adapter: Any = None, trust_remote_code: bool = False,
                 limits: dict[str, ScoringLimits] | None = None) -> dspy.Module:
    """The student on its base (not finetuned) targets: the 'before' of the report, answering within `limits`
    (per model key, `base_limits`) as its finetuned self will."""
    return rebind(student, plan.key_of, dict(plan.target_of), exclude_demos=exclude_demos, inference=inference,
                  adapter=adapter, trust_remote_code=trust_remote_code, limits=limits)


def base_limits(target: str, data_file: Path, added_tokens: list[str] | tuple[str, ...], config: Config) -> ScoringLimits:
    """The limits of a model key's base target, from the teacher's answers in its training data, measured in
    the target's tokens as training measures them (`render.answer_token_counts`); an explicit
    `max_tokens_ceiling` wins."""
    from transformers import AutoConfig, AutoTokenizer

    remote = config.train.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=remote)
    add_answer_tokens(tokenizer, added_tokens)
    kind = model_kind(AutoConfig.from_pretrained(target, trust_remote_code=remote))
    encoded, _ = encode_records(tokenizer, read_jsonl(data_file), kind, config.train.max_length)
    counts = answer_token_counts(encoded) or [0]
    ceiling = config.inference.max_tokens_ceiling or token_ceiling(counts[-1], config.inference.max_tokens)
    median = counts[len(counts) // 2] if kind == "causal" else 0
    return ScoringLimits(ceiling, config.train.max_length - median)


def program_state(program: dspy.Module) -> dict[str, Any]:
    """The program's JSON state as `Module.save` writes it, tolerating parameters without `json_mode`.

    DSPy 3.4's `dspy.Retrieve.dump_state()` takes no `json_mode`, so `save("p.json")` fails on any
    program holding one (the documented RAG among them); program.json is written through this instead.
    Each LM's state goes through `public_lm_state`: no header, token or URL credential is written
    (`load` rebuilds the LMs from the run's models, never from this state).
    """
    state = {}
    for name, param in program.named_parameters():
        try:
            state[name] = param.dump_state(json_mode=True)
        except TypeError:
            state[name] = param.dump_state()
        if isinstance(state[name], dict) and isinstance(state[name].get("lm"), dict):
            state[name]["lm"] = public_lm_state(state[name]["lm"])
    return state


def rebind_run(program: dspy.Module, run: RunDir, description: RunDescription, *, inference: InferenceConfig,
               exclude_demos: bool = False, adapter: Any = None, trust_remote_code: bool | None = None) -> dspy.Module:
    """`program` bound to a run's models, as its config.json (`description`) maps predictors to model keys.

    The adapter is the one config.json records unless `adapter` is given; the models run their own code only
    with `trust_remote_code=True`, whatever config.json says.
    """
    keys = description.model_keys
    return rebind(program, description.key_of(), {k: str(run.model_dir(k)) for k in keys}, exclude_demos=exclude_demos,
                  inference=inference, sources={k: run.model_uri(k) for k in keys},
                  adapter=adapter or adapter_from_spec(description.adapter),
                  trust_remote_code=description.trusts_remote_code(trust_remote_code))


def load(run_dir: str | Path, program: dspy.Module | None = None, *, device: str | None = None,
         serve_url: str | None = None, adapter: Any = None, trust_remote_code: bool | None = None,
         api_key: str | None = None) -> dspy.Module:
    """Rebuilds a compiled program from its run directory.

    Args:
        run_dir: The run directory of a finished compile: its folder, or its URI on cloud
            storage (`s3://bucket/runs/Name-1a2b3c`; fetched into the local mirror first).
        program: A fresh instance of the program class; None imports the class recorded in
            config.json and calls it with no arguments.
        device: Where the finetuned models run; None picks CUDA when present.
        serve_url: The base URL of `bootfinetune serve` for this run (`http://127.0.0.1:8000/v1`):
            predictors then call `dspy.LM("openai/<model key>", api_base=serve_url)` over HTTP
            instead of loading the models in this process.
        adapter: The DSPy adapter the predictors format prompts with; None uses the one the run
            was trained with (recorded in config.json).
        api_key: The key of the server at `serve_url` (`bootfinetune serve --api-key`); None:
            `$BOOTFINETUNE_API_KEY`, else none.
        trust_remote_code: Let the models' own code run when they load: only when True, never taken from
            config.json (a run directory never widens what its reader allowed; docs/failures.md, "Trust").

    Raises:
        ProgramError: no program.json, or config.json's `program_class` is not a dspy.Module subclass.
    """
    run = RunDir.from_location(run_dir)
    run.pull()
    if not run.program_json.exists():
        raise ProgramError(f"run_dir: {run.location} has no program.json; is it a finished compile's run directory?")
    description = run.read_description()
    if program is None:
        path = description.program_class or ""
        if path.partition(":")[0] in ("", "__main__"):
            raise ProgramError(f"run_dir: the program class {path!r} cannot be imported here; pass "
                               f"program=YourProgram() to bootfinetune.load.")
        program = program_class(path, run.config_json)()
    state = run.read_program()
    for value in state.values():  # our LMs are rebuilt below from the run's own models
        if isinstance(value, dict) and "lm" in value:
            value["lm"] = None
    program.load_state(state)
    inference = dataclasses.replace(description.inference_config(run.config_json), device=device)
    warn_untrusted(description, description.trusts_remote_code(trust_remote_code), run.config_json)
    if serve_url:
        return rebind_served(program, description, serve_url, max_tokens=inference.max_tokens, adapter=adapter,
                             api_key=key_from(api_key))
    return rebind_run(program, run, description, inference=inference, adapter=adapter,
                      trust_remote_code=trust_remote_code)


def program_class(path: str, source: Any) -> type:
    """The class config.json names as `program_class`, refused unless it is a `dspy.Module` subclass.

    Importing its module runs that module's code, so a run directory is trusted like code (docs/failures.md,
    "Trust"); this check keeps `load` from calling anything else config.json might name (`os:system`).

    Raises:
        ProgramError: naming the class and the file when it is not a dspy.Module subclass.
    """
    cls = resolve(path)
    if not (isinstance(cls, type) and issubclass(cls, dspy.Module)):
        raise ProgramError(f"{source}: program_class {path!r} is {type(cls).__name__} {cls!r}, not a dspy.Module "
                           f"subclass; bootfinetune.load only builds dspy programs. Pass program=YourProgram() "
                           f"to bootfinetune.load, or fix program_class in {source}.")
    return cls


def rebind_served(program: dspy.Module, description: RunDescription, serve_url: str, *,
                  max_tokens: int = InferenceConfig.max_tokens, adapter: Any = None,
                  api_key: str | None = None) -> dspy.Module:
    """`program` with each predictor calling its model key on an OpenAI-compatible server (greedy), sending
    `api_key` (a server that asks for none takes the placeholder).

    The adapter is the one config.json records unless `adapter` is given.
    """
    keys = description.model_keys
    lms = {key: dspy.LM(f"openai/{key}", api_base=serve_url.rstrip("/"), api_key=api_key or LOCAL_API_KEY, cache=False,
                        temperature=0.0, max_tokens=max_tokens) for key in keys}
    compiled = program.deepcopy()
    key_of = description.key_of()
    for name, predictor in compiled.named_predictors():
        predictor.lm = lms[key_of[name]]
    adapter = adapter or adapter_from_spec(description.adapter)
    if adapter is not None:
        scope_adapter(compiled, adapter)
    compiled._compiled = True
    return compiled
