"""Stage 1: check the program, teachers and trainset before any compute.

Everything found wrong is reported at once in one `ProgramError`, each line naming the
predictor (or example) and the fix. What passes becomes a `ProgramPlan`: predictor
names, their signatures, and which model key and target serves each predictor.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import dspy

from bootfinetune.common.redaction import public_lm_args
from bootfinetune.errors import ProgramError
from bootfinetune.run.records import non_json_fields, to_jsonable
from bootfinetune.common.targets import model_path
from bootfinetune.runtime.user_code import collect_sources
from bootfinetune.runtime.worker_pickle import dumps
from bootfinetune.serving.lm import finetuned_engine

MULTITASK_KEY = "all"


@dataclass
class ProgramPlan:
    """What the checks learned about the student: who is trained on what."""

    predictors: list[str]
    """Predictor names in `named_predictors()` order."""
    signatures: dict[str, dict[str, Any]]
    """Per predictor: input and output field names and the instructions."""
    key_of: dict[str, str]
    """Per predictor: the model key that serves it ("all" in multitask mode, else its own name)."""
    target_of: dict[str, str]
    """Per model key: the Hugging Face id or directory finetuned for it."""
    program_name: str = "program"
    """The student's class name (used in the run name)."""
    warnings: list[str] = field(default_factory=list)
    """Things worth telling the user that do not stop the compile."""

    def keys(self) -> list[str]:
        return list(dict.fromkeys(self.key_of.values()))

    def predictors_of(self, key: str) -> list[str]:
        return [name for name in self.predictors if self.key_of[name] == key]


def signature_fields(predictor: dspy.Predict) -> dict[str, Any]:
    sig = predictor.signature
    return {"inputs": list(sig.input_fields), "outputs": list(sig.output_fields), "instructions": sig.instructions}


LM_TRANSPORT_ARGS = frozenset({"timeout"})
"""LM arguments that bound how long a call may take, not what it answers: left out of every identity, so
changing a teacher's timeout reuses its traces."""


def lm_identity(lm: Any) -> dict[str, Any] | None:
    """What identifies an LM in a run name, config.json and the trace identity: its class, model and options.

    Options pass through `public_lm_args`, an allow-list: any other argument (a header, a token, a
    cloud key) keeps its name but not its value, and `api_base` loses its user info and query values.
    So the same teacher keeps one identity, and no credential reaches what is written or logged.
    `LM_TRANSPORT_ARGS` (the timeout) are left out.
    """
    if lm is None:
        return None
    kwargs = {k: v for k, v in public_lm_args(getattr(lm, "kwargs", None) or {}).items() if k not in LM_TRANSPORT_ARGS}
    return {"class": type(lm).__qualname__, "model": getattr(lm, "model", None), "kwargs": to_jsonable(kwargs)}


def program_identity(program: dspy.Module) -> dict[str, Any]:
    """The program's structure for the run name: class, predictors, signatures, demos and LMs."""
    return {
        "class": type(program).__qualname__,
        "predictors": [
            {"name": name, "signature": to_jsonable(pred.signature.dump_state()),
             "demos": to_jsonable(list(pred.demos)), "lm": lm_identity(pred.lm)}
            for name, pred in program.named_predictors()
        ],
    }


def callable_identity(fn: Callable | None) -> str | None:
    """A metric's identity: its qualified name and a hash of its source where it has one."""
    if fn is None:
        return None
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = ""
    return f"{name}:{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def target_from_lm(lm: Any) -> str | None:
    """The Hugging Face id or directory a DSPy 3.x-style predictor LM names (`openai/local:org/model`).

    A `FinetunedLM` (a compiled program given as the student) names its folder: training goes on from it.
    """
    engine = finetuned_engine(lm)
    model = engine.model if engine is not None else getattr(lm, "model", None)
    if not isinstance(model, str):
        return None
    return model_path(model) or None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:60] or "model"


def check_program(
    student: Any,
    teachers: list[Any],
    *,
    target: str | dict[str, str] | None,
    multitask: bool,
    teacher_settings: dict[str, Any],
) -> ProgramPlan:
    """Checks student and teachers and decides which model serves each predictor.

    Args:
        student: The program to compile; it is not modified.
        teachers: The teacher programs (the student itself when no teacher is given).
        target: A model id or directory for every predictor, a dict per predictor name, or
            None to take each predictor's target from its own LM (DSPy 3.x style).
        multitask: One model for all predictors (key "all") or one per predictor.
        teacher_settings: Settings applied while the teacher runs; its `lm` serves any teacher predictor.

    Raises:
        ProgramError: listing every problem found.
    """
    named = _student_predictors(student)
    names = [n for n, _ in named]
    signatures = {n: signature_fields(p) for n, p in named}
    problems = _teacher_settings_problems(teacher_settings)
    fallback_lm = teacher_settings.get("lm") or dspy.settings.lm
    for t_index, teacher in enumerate(teachers):
        who = "teacher" if len(teachers) == 1 else f"teacher[{t_index}]"
        problems += _teacher_problems(who, teacher, student, named, signatures, fallback_lm)
    target_of_pred = _targets(named, target, problems)
    if problems:
        raise ProgramError(problems)
    key_of, target_of = _model_keys(names, target_of_pred, multitask)
    return ProgramPlan(predictors=names, signatures=signatures, key_of=key_of, target_of=target_of,
                       program_name=type(student).__name__)


def _student_predictors(student: Any) -> list[tuple[str, Any]]:
    """The student's named predictors; a ProgramError at once when it is no program or has none."""
    if not isinstance(student, dspy.Module):
        raise ProgramError(f"student: expected a dspy.Module, got {type(student).__name__}; pass your program instance.")
    named = list(student.named_predictors())
    if not named:
        raise ProgramError("student: the program has no dspy.Predict (or ChainOfThought) predictors to finetune; "
                           "declare them as attributes in __init__ so named_predictors() finds them.")
    return named


def _teacher_settings_problems(teacher_settings: dict[str, Any]) -> list[str]:
    unknown_settings = sorted(set(teacher_settings) - set(dspy.settings.config))
    if not unknown_settings:
        return []
    return [f"teacher_settings: unknown DSPy setting(s) {unknown_settings}; use names dspy.context "
            f"accepts, e.g. {{'lm': big_lm}}."]


def _teacher_problems(who: str, teacher: Any, student: dspy.Module, named: list[tuple[str, Any]],
                      signatures: dict[str, dict], fallback_lm: Any) -> list[str]:
    """Problems with one teacher: not a program, other predictors, shared objects, other fields, no LM to run."""
    if not isinstance(teacher, dspy.Module):
        return [f"{who}: expected a dspy.Module, got {type(teacher).__name__}."]
    names = [n for n, _ in named]
    t_named = list(teacher.named_predictors())
    t_names = [n for n, _ in t_named]
    if teacher is not student and t_names != names:
        missing, extra = sorted(set(names) - set(t_names)), sorted(set(t_names) - set(names))
        return [f"{who}: its predictors {t_names} do not match the student's {names} "
                f"(missing {missing}, extra {extra}); the teacher must be the same program class, "
                f"e.g. teacher=RAG() with its own LM."]
    problems = []
    student_ids = {id(p): n for n, p in named}
    for name, pred in t_named:
        if teacher is not student:
            if id(pred) in student_ids:
                problems.append(f"{who}: predictor {name!r} is the same object as the student's "
                                f"{student_ids[id(pred)]!r}; build the teacher as a separate instance "
                                f"(or student.deepcopy()) so finetuning never touches it.")
            t_sig, s_sig = signature_fields(pred), signatures[name]
            if (t_sig["inputs"], t_sig["outputs"]) != (s_sig["inputs"], s_sig["outputs"]):
                problems.append(f"{who}: predictor {name!r} has signature {t_sig['inputs']} -> "
                                f"{t_sig['outputs']} but the student's is {s_sig['inputs']} -> "
                                f"{s_sig['outputs']}; teacher and student must use the same fields.")
        if pred.lm is None and fallback_lm is None:
            problems.append(f"{who}: predictor {name!r} has no LM to run; call dspy.configure(lm=...), pass "
                            f"teacher_settings={{'lm': big_lm}}, or teacher.set_lm(big_lm).")
    return problems


def _targets(named: list[tuple[str, Any]], target: str | dict[str, str] | None, problems: list[str]) -> dict[str, str]:
    """Predictor name -> the model it finetunes; what cannot be decided is added to `problems`."""
    names = [n for n, _ in named]
    target_of_pred: dict[str, str] = {}
    if isinstance(target, dict):
        for key in sorted(set(target) - set(names)):
            problems.append(f"target: {key!r} is not a predictor of the student; use one of {names}.")
    for name, pred in named:
        chosen = target.get(name) if isinstance(target, dict) else target
        if chosen is None:
            chosen = target_from_lm(pred.lm)
        if chosen is None:
            problems.append(f"student: predictor {name!r} has no LM and no target; pass target='<hf id or dir>' "
                            f"(or target={{{name!r}: ...}}), or set an LM on it naming the model to finetune.")
        else:
            target_of_pred[name] = chosen
    return target_of_pred


def _model_keys(names: list[str], target_of_pred: dict[str, str], multitask: bool
                ) -> tuple[dict[str, str], dict[str, str]]:
    """(predictor name -> model key, model key -> target): one key "all" (one per target when they differ), or
    one per predictor."""
    key_of: dict[str, str] = {}
    target_of: dict[str, str] = {}
    distinct = list(dict.fromkeys(target_of_pred.values()))
    for name in names:
        tgt = target_of_pred[name]
        if multitask:
            key = MULTITASK_KEY if len(distinct) == 1 else f"{MULTITASK_KEY}-{_slug(tgt)}"
        else:
            key = name
        key_of[name] = key
        target_of[key] = tgt
    return key_of, target_of


def check_examples(examples: Any, program: dspy.Module, field_name: str = "trainset") -> list[str]:
    """Problems with a trainset or valset: empty, no inputs marked, missing program inputs, non-JSON values."""
    if examples is None:
        return [f"{field_name}: missing; pass a list of dspy.Example."]
    if not isinstance(examples, (list, tuple)) or not examples:
        return [f"{field_name}: must be a non-empty list of dspy.Example (got {type(examples).__name__} "
                f"of length {len(examples) if hasattr(examples, '__len__') else '?'})."]
    required = _required_inputs(program)
    problems, shown = [], 0
    for i, ex in enumerate(examples):
        if shown >= 5:
            problems.append(f"{field_name}: more examples have problems; fix the ones above first.")
            break
        if not isinstance(ex, dspy.Example):
            problems.append(f"{field_name}[{i}]: expected a dspy.Example, got {type(ex).__name__}; "
                            f"wrap it as dspy.Example(...).with_inputs(...).")
            shown += 1
            continue
        if ex._input_keys is None:
            problems.append(f"{field_name}[{i}]: no input fields marked; call .with_inputs("
                            f"{', '.join(repr(k) for k in (required or list(ex.keys())[:1]))}) on each example.")
            shown += 1
            continue
        missing = [k for k in required if k not in ex.inputs()]
        if missing:
            problems.append(f"{field_name}[{i}]: the program's forward() needs input(s) {missing} that the "
                            f"example does not mark as inputs (its inputs: {sorted(ex.inputs().keys())}); "
                            f"add them and list them in .with_inputs(...).")
            shown += 1
            continue
        bad = non_json_fields(ex)
        if bad:
            problems.append(f"{field_name}[{i}]: field(s) {bad} hold values that are not plain JSON "
                            f"(str, number, bool, list, dict); convert them before compiling.")
            shown += 1
    return problems


def _required_inputs(program: dspy.Module) -> list[str]:
    try:
        # Through the class: reading `program.forward` on an instance makes DSPy warn.
        params = list(inspect.signature(type(program).forward).parameters.values())[1:]
    except (TypeError, ValueError, AttributeError):
        return []
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def check_picklable(obj: Any, label: str) -> list[str]:
    """A problem naming the attribute that cannot be sent to Ray workers, if any.

    The probe is the pickle the actors get (`runtime.worker_pickle`): the user's modules by reference
    (imported on the worker from their shipped files), objects of `__main__` by value.
    """
    try:
        dumps(obj)
        return []
    except Exception as exc:  # cloudpickle raises many types; we only report
        culprit = _find_unpicklable(obj, label, depth=0)
        return [f"{culprit or label} cannot be sent to Ray workers ({type(exc).__name__}: {exc}); "
                f"create it inside the program's forward(), or at the top level of a module of yours (each worker "
                f"imports the module and makes its own), or make it picklable."]


def check_user_code() -> list[str]:
    """Problems shipping the user's own modules to Ray workers (files gone, too much source)."""
    return collect_sources()[2]


def _find_unpicklable(obj: Any, path: str, depth: int) -> str | None:
    if depth > 4:
        return None
    items = obj.items() if isinstance(obj, dict) else getattr(obj, "__dict__", {}).items()
    for key, value in list(items):
        try:
            dumps(value)
        except Exception:
            return _find_unpicklable(value, f"{path}.{key}", depth + 1) or f"{path}.{key}"
    return None


def valset_overlap(trainset: list, valset: list) -> int:
    """How many valset examples have the same inputs as a trainset example."""
    seen = {json.dumps(dict(ex.inputs()), sort_keys=True, default=str) for ex in trainset}
    return sum(json.dumps(dict(ex.inputs()), sort_keys=True, default=str) in seen for ex in valset)
