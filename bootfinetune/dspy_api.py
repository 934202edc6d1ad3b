"""DSPy's two `BootstrapFinetune` call shapes, read without misreading either.

DSPy 2.4 documents `BootstrapFinetune(metric, teacher_settings, multitask)` and a keyword
`compile(student, *, teacher, trainset, ...)`; DSPy 3.x has `(metric, multitask, train_kwargs, ...)`
and `compile(student, trainset, teacher)`, with `train_kwargs` in TRL's or its local provider's
names, optionally keyed by LM. This module turns `train_kwargs` into our option names and
refuses the arguments that would otherwise be silently read in the other generation's order.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Callable

import dspy

from bootfinetune.config import TrainConfig
from bootfinetune.errors import ConfigError, ProgramError
from bootfinetune.stages.checks import target_from_lm

# DSPy 3.x `train_kwargs` names (as its local provider and TRL spell them) -> our option names.
_TRAIN_KWARGS_3X = {"per_device_train_batch_size": "bsize", "gradient_accumulation_steps": "accumsteps",
                    "learning_rate": "lr", "num_train_epochs": "epochs", "max_seq_length": "max_length",
                    "max_length": "max_length", "warmup_ratio": "warmup_ratio", "weight_decay": "weight_decay",
                    "lr_scheduler_type": "lr_schedule", "seed": "seed", "bf16": "bf16",
                    "gradient_checkpointing": "gradient_checkpointing", "max_grad_norm": "max_grad_norm",
                    "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2",
                    # TRL packs rows of max_length; ours packs each micro batch's records (the same loss per step)
                    "packing": "packing"}
_TRAIN_KWARGS_24 = {"bsize", "accumsteps", "lr", "epochs", "bf16"}
# Keys of DSPy 3.x's local provider (`dspy.clients.lm_local`): an equivalent, or why there is none.
_LOCAL_PROVIDER_KWARGS = {"use_peft": "lora"}
_NO_EQUIVALENT = {
    "output_dir": "bootfinetune writes every run under storage_path/run_name; set storage_path (and run_name) instead",
    "device": "Ray places the training workers; set use_gpu=True (with num_workers, gpus_per_worker) for GPUs, "
              "use_gpu=False for CPUs",
}
_NO_OP_VALUES = {"device": None}
INT8_REFUSED = ("int8=True: bootfinetune does not train 8-bit weights (DSPy 2.4 loaded the model with bitsandbytes "
                "for it, which Ray Train's DeepSpeed workers do not take). To save memory use peft=True (lora=True: "
                "only small adapters train), zero_stage=3 (the weights sharded across workers) with "
                "offload_optimizer=True / offload_params=True, or bf16=True; or leave int8 out.")
"""Values of those keys that ask for what bootfinetune does anyway: accepted and ignored."""


def translate_train_kwargs(train_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """DSPy `train_kwargs` (2.4, 3.x/TRL or local-provider names) as our options; unknown names raise.

    >>> translate_train_kwargs({"learning_rate": 1e-4, "bsize": 4, "use_peft": True})
    {'lr': 0.0001, 'bsize': 4, 'lora': True}
    """
    if train_kwargs is not None and not isinstance(train_kwargs, dict):
        raise ConfigError([f"train_kwargs={train_kwargs!r}: give a dict of training options, e.g. "
                           f"{{'learning_rate': 1e-4, 'num_train_epochs': 2}}."])
    options, problems = {}, []
    for name, value in (train_kwargs or {}).items():
        if name in _TRAIN_KWARGS_24:
            options[name] = value
        elif name in _TRAIN_KWARGS_3X:
            options[_TRAIN_KWARGS_3X[name]] = value
        elif name in _LOCAL_PROVIDER_KWARGS:
            options[_LOCAL_PROVIDER_KWARGS[name]] = value
        elif name in _NO_EQUIVALENT:
            if not (name in _NO_OP_VALUES and value is _NO_OP_VALUES[name]):
                problems.append(f"train_kwargs: {name}={value!r} has no bootfinetune equivalent: "
                                f"{_NO_EQUIVALENT[name]}.")
        else:
            known = sorted(_TRAIN_KWARGS_24 | set(_TRAIN_KWARGS_3X) | set(_LOCAL_PROVIDER_KWARGS))
            problems.append(f"train_kwargs: unknown key {name!r}; known keys: {', '.join(known)} "
                            f"(or pass any bootfinetune option directly).")
    if problems:
        raise ConfigError(problems)
    return options


def peft_alias(options: dict[str, Any], **given: Any) -> dict[str, Any]:
    """`options` with DSPy's LoRA switches (`use_peft`, 2.4's `peft`) given as our `lora`; None means not given.

    >>> peft_alias({"use_peft": True, "epochs": 2}), peft_alias({}, peft=None)
    ({'epochs': 2, 'lora': True}, {})
    """
    options = dict(options)
    switches = {name: value for name, value in (("use_peft", options.pop("use_peft", None)), *given.items())
                if value is not None}
    if "lora" in options:
        switches["lora"] = options["lora"]
    if len(set(map(repr, switches.values()))) > 1:
        shown = ", ".join(f"{name}={value!r}" for name, value in switches.items())
        raise ConfigError([f"{shown}: these all turn LoRA on or off and disagree; give one of them."])
    if switches:
        options["lora"] = next(iter(switches.values()))
    return options


def tracks_given_arguments(method: Callable) -> Callable:
    """`compile` as DSPy documents it, defaults included, with its body told which arguments the caller gave.

    The wrapped method takes a keyword `_given` (the names bound by the call); its signature, as `help()` and
    `inspect.signature` show it, is the method's without `_given`: `target='t5-large', bsize=12, ...`.
    """
    full = inspect.signature(method)
    shown = full.replace(parameters=[p for name, p in full.parameters.items() if name != "_given"])

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = frozenset(shown.bind(*args, **kwargs).arguments)  # a wrong call raises TypeError here, as before
        return method(*args, _given=given, **kwargs)

    wrapper.__signature__ = shown  # type: ignore[attr-defined]
    return wrapper


def documented_options(student: dspy.Module, constructor_options: dict[str, Any], *, options: dict[str, Any],
                       int8: Any = None, peft: Any = None, path_prefix: Any = None,
                       **documented: Any) -> dict[str, Any]:
    """compile()'s arguments as our options: every one given wins over the constructor's, even at its default.

    `documented` holds those of DSPy 2.4's `target, bsize, accumsteps, lr, epochs, bf16` the caller gave. Of 2.4's
    other arguments, `peft` (and `use_peft` in `options`) is `lora`, `path_prefix` is `storage_path`,
    and `int8=True` is refused (False and None are accepted). A `target` given nowhere, with an LM on
    every predictor (DSPy 3.x style), finetunes what those LMs name.

    Raises:
        ConfigError: int8=True; LoRA switches or storage places that disagree.
    """
    problems = []
    if int8 not in (None, False):
        problems.append(INT8_REFUSED if int8 is True else f"int8={int8!r}: leave it out (8-bit training is not "
                                                           f"supported; False and None are accepted).")
    chosen = dict(documented)
    try:
        chosen.update(peft_alias(options, peft=peft))
    except ConfigError as exc:
        problems += exc.problems
    if path_prefix is not None:
        if chosen.get("storage_path", path_prefix) != path_prefix:
            problems.append(f"path_prefix={path_prefix!r} and storage_path={chosen['storage_path']!r}: both place the "
                            f"run; give one (path_prefix is DSPy 2.4's name for storage_path).")
        chosen["storage_path"] = path_prefix
    if problems:
        raise ConfigError(problems)
    if "target" not in chosen and "target" not in constructor_options and all(
            p.lm is not None for p in student.predictors()):
        chosen["target"] = {name: target_from_lm(p.lm) or TrainConfig.target for name, p in student.named_predictors()}
    return chosen


def train_kwargs_options(train_kwargs: Any) -> tuple[dict[str, Any], list[dspy.BaseLM]]:
    """(our options, the LMs it is keyed by) for `train_kwargs` as DSPy 2.4 or 3.x give it.

    DSPy 3.x also keys `train_kwargs` by LM, `{student_lm: {...}}`. bootfinetune trains every model
    of a compile with one set of options, so the LMs' dicts must translate to the same options.
    """
    if not isinstance(train_kwargs, dict) or not any(isinstance(k, dspy.BaseLM) for k in train_kwargs):
        return translate_train_kwargs(train_kwargs), []
    if not all(isinstance(k, dspy.BaseLM) for k in train_kwargs):
        raise ConfigError(["train_kwargs: mixes LM keys and option names; key every entry by an LM "
                           "({lm: {...}}, DSPy 3.x's form) or give one dict of options."])
    translated, problems = {}, []
    for lm, kwargs in train_kwargs.items():
        model = getattr(lm, "model", repr(lm))
        try:
            translated[model] = translate_train_kwargs(kwargs)
        except ConfigError as exc:
            problems += [p.replace("train_kwargs", f"train_kwargs[{model!r}]", 1) for p in exc.problems]
    if problems:
        raise ConfigError(problems)
    if len({json.dumps(t, sort_keys=True, default=str) for t in translated.values()}) > 1:
        shown = "; ".join(f"{model}: {t}" for model, t in translated.items())
        raise ConfigError([f"train_kwargs: different options per LM ({shown}); bootfinetune trains every model of "
                           f"a compile with the same options. Give one dict, or compile those predictors separately."])
    return next(iter(translated.values())), list(train_kwargs)


def check_positional(metric: Any, teacher_settings: Any, multitask: Any) -> None:
    """DSPy 3.x's positional order (metric, multitask, train_kwargs) must not be misread as 2.4's."""
    problems = []
    if teacher_settings is not None and not isinstance(teacher_settings, dict):
        problems.append(f"teacher_settings={teacher_settings!r}: must be a dict of dspy.context settings, e.g. "
                        f"{{'lm': big_lm}}. bootfinetune keeps DSPy 2.4's positional order (metric, teacher_settings, "
                        f"multitask); DSPy 3.x's is (metric, multitask, ...), so pass multitask by keyword: "
                        f"BootstrapFinetune(metric, multitask={teacher_settings!r}).")
    if isinstance(multitask, dict):
        problems.append("multitask: got a dict; in DSPy 3.x's positional order that is train_kwargs. Pass it by "
                        "keyword: BootstrapFinetune(metric, train_kwargs={...}).")
    if metric is not None and not callable(metric):
        problems.append(f"metric={metric!r}: must be a function metric(example, prediction, trace), or None.")
    if problems:
        raise ConfigError(problems)


def check_compile_arguments(student: Any, trainset: Any, teacher: Any, train_kwargs_lms: list) -> None:
    """A trainset and a teacher in each other's place, or train_kwargs keyed by foreign LMs, raise."""
    if trainset is None:
        raise ProgramError("trainset: required; compile(student, trainset) or compile(student, trainset=examples).")
    if isinstance(trainset, dspy.Module):
        raise ProgramError("trainset: got a dspy.Module. compile's positional order is DSPy 3.x's (student, "
                           "trainset, teacher); pass the teacher by keyword: compile(student, trainset=examples, "
                           "teacher=program).")
    if isinstance(teacher, (list, tuple)) and teacher and isinstance(teacher[0], dspy.Example):
        raise ProgramError("teacher: got a list of examples. compile's positional order is (student, trainset, "
                           "teacher); pass the examples as trainset.")
    student_lms = {id(p.lm) for p in student.predictors() if p.lm is not None}
    foreign = [getattr(lm, "model", repr(lm)) for lm in train_kwargs_lms if id(lm) not in student_lms]
    if foreign:
        raise ConfigError([f"train_kwargs: keyed by LM(s) {foreign} that no predictor of the student holds; key it "
                           f"by the student's own LMs (student.predictors()[i].lm), or give one dict of options."])
