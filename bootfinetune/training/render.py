"""The one renderer: chat messages → model input, for training and for inference alike.

A record's `messages` is a list of `{"role", "content"}` dicts; for training the last one
is the assistant's answer. The prompt is every message before it.

- Causal LMs: the prompt is rendered with the tokenizer's chat template where it has one
  (with the generation prompt), else with bootfinetune's fixed template (`FIXED_TEMPLATE`).
  The answer tokens follow the prompt tokens and end with EOS. Loss is taken on the answer
  only: `labels` is -100 over the prompt.
- Seq2seq (T5 family): the rendered prompt goes to the encoder; the answer (+ EOS) is the
  decoder target.

The prompt is tokenized on its own, exactly as `encode_prompt` does at inference, so a
finetuned model sees at serving time the very token ids it was trained on.

Sequences longer than `max_length` are cut from the prompt's left side (keeping any
leading special tokens such as BOS) so that the answer stays whole when it can; each cut
example is flagged, and `encode_records` returns how many were cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

from bootfinetune.common.chat import ends_with_answer, first_bad_message
from bootfinetune.run.jsonio import fingerprint

IGNORE_INDEX = -100
"""Label value the loss ignores (prompt tokens and padding)."""

RENDERER_VERSION = "bootfinetune.render/1"
"""Bumped whenever rendering changes the token ids it produces."""

FIXED_ROLE = "<|{role}|>\n{content}\n"
FIXED_GENERATION_PROMPT = "<|assistant|>\n"
FIXED_TEMPLATE = FIXED_ROLE + "..." + FIXED_GENERATION_PROMPT
"""Our template for tokenizers without a chat template: one `<|role|>` block per message."""

ModelKind = Literal["causal", "seq2seq"]


@dataclass(frozen=True)
class Encoded:
    """One tokenized training example.

    `input_ids` is the whole sequence for a causal LM (prompt + answer), the encoder
    input for seq2seq. `labels` is aligned with `input_ids` for causal (-100 over the
    prompt), the decoder target for seq2seq. `truncated` says whether anything was cut.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def model_kind(config: Any) -> ModelKind:
    """"seq2seq" for encoder-decoder models (T5, BART...), else "causal", read from a model config."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as SEQ2SEQ

    archs = getattr(config, "architectures", None) or []
    if getattr(config, "model_type", None) in SEQ2SEQ or any(a in SEQ2SEQ.values() for a in archs):
        return "seq2seq"
    return "causal"


def uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt_text(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The prompt as text: the chat template with its generation prompt, else our fixed template.

    Example (a tokenizer without a chat template):
        [{"role": "user", "content": "2+2?"}] → "<|user|>\\n2+2?\\n<|assistant|>\\n"
    """
    _check_messages(messages, need_answer=False)
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "".join(FIXED_ROLE.format(role=m["role"], content=m["content"]) for m in messages) + FIXED_GENERATION_PROMPT


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], kind: ModelKind,
                  max_length: int | None = None) -> list[int]:
    """Prompt token ids for inference: exactly the ids training put before the answer.

    Args:
        tokenizer: The finetuned model's tokenizer.
        messages: The chat without the final assistant turn.
        kind: "causal" or "seq2seq" (see `model_kind`).
        max_length: When given, the prompt is cut from the left to this many tokens
            (leading/trailing special tokens kept), as in training.

    Returns:
        Token ids: feed them as `input_ids` (causal: generate after them; seq2seq: encoder input).
    """
    prefix, body, suffix = _prompt_parts(tokenizer, messages, kind)
    if max_length is not None:
        body = _keep_tail(body, max_length - len(prefix) - len(suffix))
    return prefix + body + suffix


def encode_example(tokenizer: Any, messages: Sequence[dict[str, str]], kind: ModelKind, max_length: int) -> Encoded:
    """Tokenizes one training conversation (last message = assistant answer).

    Example (causal, fixed template, max_length large enough):
        prompt ids P = encode_prompt(tok, messages[:-1], "causal"), answer ids A (+ EOS)
        → input_ids = P + A, labels = [-100] * len(P) + A
    """
    return encode_records(tokenizer, [{"messages": messages}], kind, max_length)[0][0]


def encode_records(tokenizer: Any, records: Iterable[dict[str, Any]], kind: ModelKind,
                   max_length: int) -> tuple[list[Encoded], int]:
    """Tokenizes records (`{"messages": [...], ...}`); returns them and how many were truncated.

    Each record's prompt and answer are rendered to text first and tokenized in two batch calls, with the
    ids a call per text would give."""
    conversations = [r["messages"] for r in records]
    for messages in conversations:
        _check_messages(messages, need_answer=True)
    if not conversations:
        return [], 0
    prompts = tokenizer([render_prompt_text(tokenizer, m[:-1]) for m in conversations],
                        add_special_tokens=False)["input_ids"]
    answers = tokenizer([_answer_text(tokenizer, m, kind) for m in conversations],
                        add_special_tokens=False)["input_ids"]
    prefix, suffix = _affixes(tokenizer, kind)
    out = [_fit(list(body), _with_eos(tokenizer, answer), prefix, suffix, kind, max_length, tokenizer.eos_token_id)
           for body, answer in zip(prompts, answers)]
    return out, sum(e.truncated for e in out)


def answer_token_counts(examples: Iterable[Encoded]) -> list[int]:
    """Each example's answer length in tokens (its labels, EOS included), shortest first: the training loop's
    median and longest answer, and the ceiling scoring and serving derive from the longest."""
    return sorted(e.answer_tokens for e in examples)


def _fit(body: list[int], answer: list[int], prefix: list[int], suffix: list[int], kind: ModelKind, max_length: int,
         eos: int | None) -> Encoded:
    """One example from its prompt body and answer ids, cut to `max_length` (see the module docstring)."""
    if kind == "seq2seq":
        room = max_length - len(prefix) - len(suffix)
        cut_body, cut_answer = _keep_tail(body, room), answer[:max_length]
        truncated = len(cut_body) < len(body) or len(cut_answer) < len(answer)
        return Encoded(prefix + cut_body + suffix, cut_answer, truncated)
    budget = max_length - len(prefix) - len(answer)
    if len(body) <= budget:
        return Encoded(prefix + body + answer, [IGNORE_INDEX] * (len(prefix) + len(body)) + answer, False)
    # Cut the prompt from the left; if even then the answer does not fit, keep a quarter of
    # the length for the prompt's tail and cut the answer's end.
    keep = max(budget, min(len(body), max_length // 4))
    body = _keep_tail(body, keep)
    answer = answer[: max(0, max_length - len(prefix) - len(body))]
    if not answer and eos is not None:  # never an example with nothing to learn
        answer, body = [eos], _keep_tail(body, max_length - len(prefix) - 1)
    return Encoded(prefix + body + answer, [IGNORE_INDEX] * (len(prefix) + len(body)) + answer, True)


def collate(examples: Sequence[Encoded], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Pads a micro batch on the right into tensors (`labels` padded with -100).

    Causal inputs and labels have the same length; for seq2seq the encoder input and the
    decoder target are padded separately (the model builds decoder inputs from `labels`).

    Example:
        >>> b = collate([Encoded([5, 6, 7], [-100, 6, 7], False), Encoded([5, 8], [-100, 8], False)], pad_id=0)
        >>> b["input_ids"].tolist(), b["attention_mask"].tolist()
        ([[5, 6, 7], [5, 8, 0]], [[1, 1, 1], [1, 1, 0]])
        >>> b["labels"].tolist()
        [[-100, 6, 7], [-100, 8, -100]]
    """
    import torch

    def pad(rows: list[list[int]], value: int) -> "torch.Tensor":
        width = max(len(r) for r in rows)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    ids = [e.input_ids for e in examples]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(r) for r in ids], 0),
        "labels": pad([e.labels for e in examples], IGNORE_INDEX),
    }


def decode_answer(tokenizer: Any, ids: Sequence[int]) -> str:
    """Generated ids as text: the one decode of training checks, `FinetunedLM` and the servers.

    Special tokens are skipped. A SentencePiece-style tokenizer (Metaspace prepending "▁" to
    every segment, as T5's does) writes a "▁" after each added token, since the text after an
    added token is a new segment; decoding each segment on its own drops exactly that "▁",
    so "\n" + "▁blue" reads "\nblue", as it was written. Other tokenizers decode as usual.

    Example (a T5-like tokenizer with "\n" added): ids of "[[ ## answer ## ]]\nblue" decode to
    "[[ ## answer ## ]]\nblue", where `tokenizer.decode` gives "[[ ## answer ## ]]\n blue".
    """
    added = _segment_tokens(tokenizer)
    if not added or not any(i in added for i in ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    parts, run = [], []
    for i in ids:
        if i in added:
            parts += [tokenizer.decode(run, skip_special_tokens=True), added[i]]
            run = []
        else:
            run.append(i)
    parts.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(parts)


def _segment_tokens(tokenizer: Any) -> dict[int, str]:
    """Non-special added tokens {id: text} when the pre-tokenizer prefixes every segment, else {}."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None:
        return {}
    stack = [json.loads(pre.__getstate__())]
    prefixes = False
    while stack:
        node = stack.pop()
        stack += node.get("pretokenizers") or []
        if node.get("type") == "Metaspace" and (node.get("prepend_scheme") == "always" or node.get("add_prefix_space")):
            prefixes = True
    if not prefixes:
        return {}
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if not t.special}


def renderer_identity(tokenizer: Any, kind: ModelKind) -> dict[str, Any]:
    """What the inference side must match: renderer version, template and its hash, model kind."""
    chat = uses_chat_template(tokenizer)
    template = tokenizer.chat_template if chat else FIXED_TEMPLATE
    return {"renderer": RENDERER_VERSION, "kind": kind, "template": "chat_template" if chat else "fixed",
            "template_sha": fingerprint(template), "eos_token": tokenizer.eos_token}


def _prompt_parts(tokenizer: Any, messages: Sequence[dict[str, str]], kind: ModelKind):
    """(leading special ids, prompt body ids, trailing special ids) for the prompt."""
    text = render_prompt_text(tokenizer, messages)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix, suffix = _affixes(tokenizer, kind)
    return prefix, body, suffix


def _affixes(tokenizer: Any, kind: ModelKind) -> tuple[list[int], list[int]]:
    """The special ids around a prompt body: none where a causal model's chat template writes its own (as
    HF's apply_chat_template does); else the tokenizer's leading ones, and for seq2seq its trailing ones."""
    if uses_chat_template(tokenizer) and kind == "causal":
        return [], []
    prefix, suffix = _special_affixes(tokenizer)
    return prefix, (suffix if kind == "seq2seq" else [])


def _answer_text(tokenizer: Any, messages: Sequence[dict[str, str]], kind: ModelKind) -> str:
    """The answer as the model learns to write it."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so answers can end.")
    segment = messages[-1]["content"]
    if kind == "causal" and uses_chat_template(tokenizer):
        # The template's own answer rendering (e.g. "answer<|im_end|>") so the model learns its end-of-turn.
        prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(list(messages), tokenize=False)
        if full.startswith(prompt):
            segment = full[len(prompt):].rstrip()
    return segment


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return list(ids) if ids and ids[-1] == eos else list(ids) + [eos]


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer adds before and after a text (e.g. BOS; T5's trailing EOS)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare):])
    return [], []


def _keep_tail(ids: list[int], n: int) -> list[int]:
    """The last `n` ids (all of them if they fit, none if n <= 0)."""
    if n >= len(ids):
        return list(ids)
    return list(ids[len(ids) - n:]) if n > 0 else []


def _check_messages(messages: Any, need_answer: bool) -> None:
    if not isinstance(messages, (list, tuple)) or first_bad_message(messages) is not None:
        raise ValueError("messages must be a list of {'role': str, 'content': str} dicts.")
    if need_answer and not ends_with_answer(messages):
        raise ValueError("a training record needs a prompt and a final assistant message (the answer); "
                         f"got roles {[m['role'] for m in messages]}.")
