"""The DSPy adapter of a compile: which one, its training records, and the compiled program's use of it.

One adapter writes every prompt a compile produces: the teacher's, the finetuning records'
and the compiled program's at inference. It is the one given to `BootstrapFinetune(adapter=...)`,
else `dspy.settings.adapter`, else `dspy.ChatAdapter()` (`resolve_adapter`).

Training records come from the adapter's own formatting. DSPy 3.4.1's
`JSONAdapter.format_finetune_data` raises `NotImplementedError`, so where an adapter has no
working `format_finetune_data` the record is built from `adapter.format(...)` (system, demos,
user) plus `adapter.format_assistant_message_content(...)` (the answer), which is what
`ChatAdapter.format_finetune_data` does itself. Every answer is then parsed back with
`adapter.parse` and must give the teacher's outputs (`answer_problem`).

DSPy's `Predict` reads the adapter from `dspy.settings` at call time and has no per-predictor
or per-LM hook, so `scope_adapter` gives each predictor of the compiled program a `forward`
(and `aforward`) that runs the class's own inside `dspy.context(adapter=...)`. That is an
ordinary picklable attribute: it survives `deepcopy`, cloudpickle (Ray, `save_program=True`),
and `bootfinetune.load` restores it from config.json (`adapter_spec`). DSPy's JSON state has no
place for it: a program rebuilt with `program.load("state.json")` needs `scope_adapter` again.

Example:
    >>> import dspy
    >>> sig = dspy.Predict("question -> answer").signature
    >>> messages = finetune_messages(dspy.JSONAdapter(), sig, [], {"question": "2+2?"}, {"answer": "4"})
    >>> messages[-1]["content"]
    '{\\n  "answer": "4"\\n}'
    >>> answer_problem(dspy.JSONAdapter(), sig, messages[-1]["content"], {"answer": "4"}) is None
    True
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from bootfinetune.common.importpath import class_path, resolve
from bootfinetune.run.records import to_jsonable
from bootfinetune.errors import ConfigError, ProgramError

_ADAPTER_METHODS = ("format", "format_assistant_message_content", "parse")


def adapter_problems(adapter: Any, field: str = "adapter") -> list[str]:
    """Why `adapter` cannot format training records and parse answers (empty when it can).

    >>> adapter_problems(dspy.JSONAdapter)
    ['adapter: got the class JSONAdapter; pass an instance, adapter=dspy.JSONAdapter().']
    """
    if isinstance(adapter, type):
        return [f"{field}: got the class {adapter.__name__}; pass an instance, {field}=dspy.{adapter.__name__}()."]
    missing = [m for m in _ADAPTER_METHODS if not callable(getattr(adapter, m, None))]
    if missing:
        return [f"{field}: {type(adapter).__name__} lacks {', '.join(missing)}; pass a DSPy adapter such as "
                f"dspy.ChatAdapter(), dspy.JSONAdapter() or dspy.XMLAdapter()."]
    return []


def adapter_option(adapter: Any) -> Any:
    """`BootstrapFinetune(adapter=...)` as one adapter (or None); DSPy 3.x's `{lm: adapter}` form too.

    A dict keyed by LM is accepted when it names one adapter for all of them: a compile trains
    every model key with the same prompt format. Raises `ConfigError` otherwise.
    """
    if adapter is None:
        return None
    if isinstance(adapter, dict):
        if not adapter or not all(isinstance(k, dspy.BaseLM) for k in adapter):
            raise ConfigError(["adapter: a dict must map the student's LMs to adapters (DSPy 3.x's form), "
                               "e.g. {student_lm: dspy.JSONAdapter()}; or pass one adapter."])
        kinds = {adapter_spec(a)["class"] for a in adapter.values()}
        if len(kinds) > 1:
            raise ConfigError([f"adapter: different adapters per LM ({', '.join(sorted(kinds))}); bootfinetune "
                               f"formats every model of a compile with one adapter. Pass one adapter, or compile "
                               f"the predictors separately."])
        adapter = next(iter(adapter.values()))
    problems = adapter_problems(adapter)
    if problems:
        raise ConfigError(problems)
    return adapter


def resolve_adapter(adapter: Any | None = None) -> Any:
    """The adapter in use: the given one, else the configured one (`dspy.configure(adapter=...)`), else ChatAdapter."""
    adapter = adapter or dspy.settings.adapter or dspy.ChatAdapter()
    problems = adapter_problems(adapter)
    if problems:
        raise TypeError(problems[0])
    return adapter


def finetune_messages(adapter: Any, signature: Any, demos: list, inputs: dict[str, Any],
                      outputs: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages that teach a predictor with `signature` to answer `inputs` with `outputs`.

    The adapter's own `format_finetune_data` where it works; where it raises
    `NotImplementedError` (JSONAdapter in DSPy 3.4.1) or is missing, the adapter's prompt
    (`format`) followed by its way of writing an answer (`format_assistant_message_content`).
    """
    build = getattr(adapter, "format_finetune_data", None)
    if build is not None:
        try:
            return build(signature=signature, demos=demos, inputs=inputs, outputs=outputs)["messages"]
        except NotImplementedError:
            pass  # the documented gap: fall through to the adapter's own formatting, below
    prompt = adapter.format(signature=signature, demos=demos, inputs=inputs)
    answer = adapter.format_assistant_message_content(signature=signature, outputs=outputs)
    return [*prompt, {"role": "assistant", "content": answer}]


def _comparable(value: Any) -> Any:
    value = to_jsonable(value)
    return value.strip() if isinstance(value, str) else value


def answer_problem(adapter: Any, signature: Any, answer: str, outputs: dict[str, Any]) -> str | None:
    """Why `adapter.parse(signature, answer)` does not give back `outputs` (None when it does).

    Values are compared as JSON, strings without surrounding whitespace (every adapter strips them).
    """
    try:
        parsed = adapter.parse(signature, answer)
    except (AdapterParseError, ValueError) as exc:
        return f"{type(adapter).__name__} cannot parse the answer it wrote ({type(exc).__name__}: {str(exc)[:200]})"
    for name in signature.output_fields:
        if name in outputs and _comparable(parsed.get(name)) != _comparable(outputs[name]):
            got, wanted = json.dumps(to_jsonable(parsed.get(name))), json.dumps(to_jsonable(outputs[name]))
            return f"{type(adapter).__name__} reads field {name!r} back as {got[:120]} instead of {wanted[:120]}"
    return None


# -- the adapter of a compiled program ------------------------------------------------------------

class AdapterScoped:
    """A predictor's `forward` (or `aforward`) that runs the class's own with one adapter in effect.

    Set as an instance attribute by `scope_adapter`; plain data (the predictor, the adapter, the
    method's name), so it deep-copies and pickles with the predictor.
    """

    def __init__(self, predictor: Any, adapter: Any, method: str):
        self.predictor, self.adapter, self.method = predictor, adapter, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        own = getattr(type(self.predictor), self.method)
        if self.method == "aforward":
            return self._acall(own, *args, **kwargs)
        with dspy.context(adapter=self.adapter):
            return own(self.predictor, *args, **kwargs)

    async def _acall(self, own: Any, *args: Any, **kwargs: Any) -> Any:
        with dspy.context(adapter=self.adapter):
            return await own(self.predictor, *args, **kwargs)


def scope_adapter(program: dspy.Module, adapter: Any) -> dspy.Module:
    """Makes every predictor of `program` format its prompts with `adapter`, whatever is configured; in place.

    A `dspy.context(adapter=...)` around the call does not change it: the models were trained on
    this adapter's format.
    """
    for _, predictor in program.named_predictors():
        predictor.forward = AdapterScoped(predictor, adapter, "forward")
        predictor.aforward = AdapterScoped(predictor, adapter, "aforward")
    return program


def adapter_of(predictor: Any) -> Any | None:
    """The adapter `scope_adapter` gave a predictor, or None."""
    scoped = vars(predictor).get("forward")
    return scoped.adapter if isinstance(scoped, AdapterScoped) else None


def adapter_spec(adapter: Any) -> dict[str, Any]:
    """The adapter as config.json records it: its class path and its JSON-valued constructor options.

    >>> adapter_spec(dspy.XMLAdapter())["class"]
    'dspy.adapters.xml_adapter:XMLAdapter'
    """
    params = inspect.signature(type(adapter).__init__).parameters
    options = {name: value for name, value in vars(adapter).items()
               if name in params and (value is None or isinstance(value, (bool, int, float, str)))}
    return {"class": class_path(adapter), "options": options}


def adapter_from_spec(spec: dict[str, Any] | None) -> Any | None:
    """The adapter `adapter_spec` recorded (None for runs recorded before adapters were)."""
    if not spec:
        return None

    try:
        cls = resolve(spec["class"])
    except (ImportError, AttributeError) as exc:
        raise ProgramError(f"adapter: the run was trained with {spec['class']}, which does not import here ({exc}); "
                           f"pass adapter=YourAdapter() to bootfinetune.load.") from exc
    if not (isinstance(cls, type) and issubclass(cls, dspy.Adapter)):  # config.json may name any callable
        raise ProgramError(f"adapter: config.json names {spec['class']!r}, which is not a dspy.Adapter subclass; "
                           f"pass adapter=YourAdapter() to bootfinetune.load, or fix adapter.class in config.json.")
    try:
        return cls(**spec.get("options", {}))
    except TypeError as exc:  # an adapter whose constructor needs objects config.json cannot hold
        raise ProgramError(f"adapter: {spec['class']} cannot be rebuilt from config.json's options ({exc}); "
                           f"pass adapter=YourAdapter(...) to bootfinetune.load.") from exc
