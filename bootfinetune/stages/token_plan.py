"""The tokens each model key's answers need from its target's tokenizer, planned before training.

A SentencePiece tokenizer like T5's collapses newlines and runs of spaces into one space and
has no `{`, `}` or `<`, so a model trained on its tokens cannot write DSPy's answer formats
(ChatAdapter's `[[ ## answer ## ]]\\n...` comes back on one line and does not parse).

Before training, `plan_tokens` encodes and decodes every training answer with the target's
tokenizer, exactly as inference will (`render.decode_answer`), and compares what the adapter
parses from both. The characters that answers lose (found by encoding them, not from a list)
become tokens added to the tokenizer (`AddedToken(normalized=False)`, so the normalizer
cannot collapse them), and the model's embeddings grow to match in the training worker
(`training/answer_tokens.py`). The export in `models/{key}/` carries the extended
tokenizer: a plain Hugging Face model that every loader of it (FinetunedLM, `bootfinetune
serve`, `bootfinetune.load`, other servers) reads the same way.

A loss that added tokens cannot fix (a run of spaces inside a value, say) stops the compile
before training, naming what is lost and how to fix it. Byte-level BPE tokenizers lose
nothing, so nothing is added for them.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from bootfinetune.errors import ConfigError
from bootfinetune.run.jsonio import read_jsonl
from bootfinetune.training.answer_tokens import add_answer_tokens, roundtrip

log = logging.getLogger(__name__)

Parse = Callable[[dict, str], Any]
"""`parse(record, answer_text)` -> what the answer means (e.g. the adapter's field values); raises if unreadable."""

SHOWN = 3
"""Answers quoted in an error."""


@dataclass
class TokenPlan:
    """What one model key's tokenizer needs so that every answer survives it."""

    key: str
    """The model key."""
    target: str
    """The base model whose tokenizer was checked."""
    answers: int = 0
    """Answers (final assistant messages) checked."""
    needed: int = 0
    """Answers that did not survive the tokenizer as it is (each fixed by `added_tokens`)."""
    added_tokens: list[str] = field(default_factory=list)
    """Tokens to add, in order; empty when every answer survives."""
    unfixable: list[dict[str, Any]] = field(default_factory=list)
    """Answers still lost after adding the tokens (first few): predictor, example_index, answer, decoded."""
    unfixable_count: int = 0
    """How many answers are still lost."""

    def to_report(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("unfixable")
        return d


def layout_parse(record: dict, text: str) -> str:
    """A parse for answers without a known adapter: the text, line breaks kept, spaces within a line ignored.

    Example:
        layout_parse({}, "{\\n  \\"a\\":  1\\n}") == '{\\n"a": 1\\n}'
    """
    return "\n".join(" ".join(line.split()) for line in text.strip().splitlines() if line.strip())


def adapter_parse(adapter: Any, signatures: dict[str, Any]) -> Parse:
    """A parse with the adapter in use: the field values it reads with the record's predictor's signature."""
    def parse(record: dict, text: str) -> Any:
        signature = signatures.get(record.get("predictor"))
        if signature is None:
            return layout_parse(record, text)
        return adapter.parse(signature, text)

    return parse


def lost_characters(tokenizer: Any, text: str) -> list[str]:
    """Characters of `text` that do not come back from encode -> decode, each tried between two letters.

    Example (a T5-like tokenizer): lost_characters(tok, "a\\n{b}") == ["\\n", "{", "}"]
    """
    return [c for c in dict.fromkeys(text) if c != " " and roundtrip(tokenizer, f"a{c}b") != f"a{c}b"]


def plan_tokens(tokenizer: Any, records: list[dict], parse: Parse, *, key: str, target: str) -> TokenPlan:
    """Checks every record's answer against `tokenizer` and decides which tokens to add.

    Args:
        tokenizer: The target's tokenizer (not modified).
        records: Finetuning records (`{"messages": [..., {"role": "assistant", ...}], "predictor": ...}`).
        parse: What an answer means; two answers that parse the same are the same answer.
        key: The model key (for messages).
        target: The base model (for messages).

    Returns:
        The plan; `unfixable` lists answers no added token can save (see `raise_if_unfixable`).
    """
    plan = TokenPlan(key=key, target=target)
    failing = []
    for record in records:
        answer = record["messages"][-1]["content"]
        plan.answers += 1
        if not _survives(tokenizer, record, answer, parse):
            failing.append(record)
    plan.needed = len(failing)
    if not failing:
        return plan
    lost = dict.fromkeys(c for r in failing for c in lost_characters(tokenizer, r["messages"][-1]["content"]))
    plan.added_tokens = list(lost)
    extended = copy.deepcopy(tokenizer)
    add_answer_tokens(extended, plan.added_tokens)
    still = [r for r in failing if not _survives(extended, r, r["messages"][-1]["content"], parse)]
    plan.unfixable_count = len(still)
    plan.unfixable = [{"predictor": r.get("predictor"), "example_index": r.get("example_index"),
                       "answer": r["messages"][-1]["content"],
                       "decoded": roundtrip(extended, r["messages"][-1]["content"])} for r in still[:SHOWN]]
    if plan.added_tokens:
        log.info("model %r: %d of %d answers lose %s with %s's tokenizer; adding them as tokens", key, plan.needed,
                 plan.answers, ", ".join(repr(t) for t in plan.added_tokens), target)
    return plan


def plan_for_files(key: str, target: str, files: Iterable[Any], parse: Parse = layout_parse, *,
                   trust_remote_code: bool = False) -> TokenPlan:
    """`plan_tokens` for a model key's data files (train and eval), with the target's own tokenizer."""
    from transformers import AutoTokenizer

    # a missing file is reported by the stage that needs it; here there is just nothing to check
    records = [r for f in files if f is not None and Path(f).exists() for r in read_jsonl(f)]
    tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    return plan_tokens(tokenizer, records, parse, key=key, target=target)


def raise_if_unfixable(plans: Iterable[TokenPlan]) -> None:
    """Raises one ConfigError naming every key whose answers the tokenizer loses even with added tokens."""
    problems = []
    for plan in plans:
        if not plan.unfixable_count:
            continue
        shown = "; ".join(f"{u['predictor']} example {u['example_index']}: {json.dumps(u['answer'])} comes back as "
                          f"{json.dumps(u['decoded'])}" for u in plan.unfixable)
        problems.append(
            f"target {plan.target!r} (model {plan.key!r}): {plan.unfixable_count} of {plan.answers} answers lose "
            f"text its tokenizer cannot write even with added tokens ({', '.join(_lost_text(plan))}), e.g. {shown}. "
            f"Fix: use a target whose tokenizer keeps this text (a byte-level BPE one, e.g. Qwen or GPT-2), or "
            f"make the teacher's answers avoid it (e.g. a metric that rejects them).")
    if problems:
        raise ConfigError(problems)


def check_lora(plans: Iterable[Any], lora: bool) -> None:
    """Refuses LoRA when tokens must be added: the new embedding rows would not train under frozen base weights.

    `plans` are `TokenPlan`s or `FinetuneJob`s: anything with `key`, `target` and `added_tokens`.
    """
    needing = [p for p in plans if p.added_tokens]
    if lora and needing:
        raise ConfigError([
            f"lora: target {p.target!r} (model {p.key!r}) needs new tokens {list(p.added_tokens)} so that its answers "
            f"survive the tokenizer, and LoRA keeps the embeddings frozen, so they would never learn them. "
            f"Fix: lora=False for this target, or a target whose tokenizer writes these characters."
            for p in needing])


def _survives(tokenizer: Any, record: dict, answer: str, parse: Parse) -> bool:
    decoded = roundtrip(tokenizer, answer)
    if decoded == answer:
        return True
    try:
        expected = parse(record, answer)
    except Exception as exc:  # an answer its own adapter cannot read: compare its layout instead
        log.debug("answer of %s does not parse (%s); comparing its text", record.get("predictor"), exc)
        return layout_parse(record, decoded) == layout_parse(record, answer)
    try:
        return parse(record, decoded) == expected
    except Exception as exc:  # the decoded answer not parsing is exactly the loss looked for
        log.debug("decoded answer of %s does not parse: %s", record.get("predictor"), exc)
        return False


def _lost_text(plan: TokenPlan) -> list[str]:
    """A short description of what differs in the unfixable answers (the first differing stretch of each)."""
    out = []
    for u in plan.unfixable:
        a, d = u["answer"], u["decoded"]
        i = next((n for n, (x, y) in enumerate(zip(a, d)) if x != y), min(len(a), len(d)))
        out.append(f"{json.dumps(a[max(0, i - 8):i + 8])} -> {json.dumps(d[max(0, i - 8):i + 8])}")
    return list(dict.fromkeys(out))
