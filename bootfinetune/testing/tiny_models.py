"""Tiny models and tokenizers built locally, for tests and the offline demo.

No machine here reaches a model hub, so tests build a model from a config, train a
tokenizer on a small corpus the way the real family's is built (byte-level BPE for the
causal models, SentencePiece-style Unigram for T5), and save both with `save_pretrained`
(safetensors). The result is an ordinary Hugging Face directory: pass it as `target`
and it goes through the real `from_pretrained` path.

A directory that already holds a model built with the same arguments is reused
(`bootfinetune_tiny.json`, written last, records them).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Sequence

from bootfinetune.run.jsonio import fingerprint, read_json, write_json

STAMP = "bootfinetune_tiny.json"
"""File written last in a built directory: the arguments it was built with."""

# ChatML-like template for the causal model that has one (eos is <|im_end|>, as in many instruct models).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_CORPUS: tuple[str, ...] = (
    string.printable,
    "[[ ## question ## ]]\n[[ ## answer ## ]]\n[[ ## reasoning ## ]]\n[[ ## context ## ]]\n[[ ## completed ## ]]",
    "Your input fields are:\n1. `question` (str):\nYour output fields are:\n1. `answer` (str):",
    "All interactions will be structured in the following way, with the appropriate values filled in.",
    "Respond with the corresponding output fields, starting with the field `[[ ## answer ## ]]`, "
    "and then ending with the marker for `[[ ## completed ## ]]`.",
    "In adhering to this structure, your objective is: Given the fields `question`, produce the fields `answer`.",
    "system user assistant The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 plus minus times equals yes no true false",
)
"""Text the tokenizer is trained on by default: ASCII plus DSPy's ChatAdapter markup."""

SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0..3: T5 wants pad=0 (also its decoder start), eos=1
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]


def build_tiny_causal(
    path: str | Path,
    *,
    arch: str = "llama",
    chat_template: bool = True,
    corpus: Sequence[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 1024,
    split_spaces: bool = False,
    tie_embeddings: bool | None = None,
    seed: int = 0,
) -> Path:
    """Builds (or reuses) a tiny causal LM with its tokenizer in `path`.

    Args:
        path: Directory to write; created if missing.
        arch: "llama" (untied embeddings) or "gpt2" (tied input/output embeddings).
        chat_template: Give the tokenizer a ChatML-like chat template (eos = <|im_end|>);
            without one the renderer falls back to bootfinetune's fixed template (eos = </s>).
        corpus: Texts the BPE tokenizer is trained on.
        vocab_size: Tokenizer vocabulary size; the model's embedding has this many rows even
            when the corpus yields fewer tokens (benchmarks want a realistic vocabulary).
        hidden_size: Model width.
        num_layers: Transformer blocks.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (llama only); default half the heads.
        intermediate_size: MLP width; default twice the model width.
        max_positions: Longest sequence the model accepts.
        split_spaces: Tokenize spaces apart from words (" Lyon" is " " + "Lyon"), so a word has one
            token wherever it stands and copying it is the identity; sequences get longer.
        tie_embeddings: Share input and output embeddings; default per arch (llama no, gpt2 yes).
        seed: Seed for the random weights.

    Returns:
        The directory, loadable with `AutoModelForCausalLM.from_pretrained(path)` and
        `AutoTokenizer.from_pretrained(path)`.
    """
    if arch not in ("llama", "gpt2"):
        raise ValueError(f"arch={arch!r}: use 'llama' or 'gpt2'.")
    args = dict(kind="causal", arch=arch, chat_template=chat_template, corpus=list(corpus), vocab_size=vocab_size,
                hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                intermediate_size=intermediate_size, max_positions=max_positions, seed=seed)
    if split_spaces:  # only when set, so directories built before these options keep their fingerprint
        args["split_spaces"] = True
    if tie_embeddings is not None:
        args["tie_embeddings"] = tie_embeddings
    path = Path(path)
    if not _is_built(path, args):
        _save(path, *_make_causal(args), args)
    return path


def _make_causal(args: dict[str, Any]) -> tuple[Any, Any]:
    """(model, tokenizer) as `build_tiny_causal`'s arguments `args` describe them."""
    import torch
    from transformers import AutoModelForCausalLM

    chat_template = args["chat_template"]
    eos = "<|im_end|>" if chat_template else "</s>"
    tokenizer = _train_tokenizer(args["corpus"], args["vocab_size"], SPECIALS + (CHAT_SPECIALS if chat_template else []),
                                 eos, split_spaces=args.get("split_spaces", False))
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    config = _causal_config(args, tokenizer)
    torch.manual_seed(args["seed"])
    return AutoModelForCausalLM.from_config(config), tokenizer


def _causal_config(args: dict[str, Any], tokenizer: Any) -> Any:
    """The Llama or GPT-2 config `args` describe, with the tokenizer's special ids and at least its vocabulary."""
    from transformers import GPT2Config, LlamaConfig

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    vocab = max(len(tokenizer), args["vocab_size"])
    hidden_size, num_layers, num_heads = args["hidden_size"], args["num_layers"], args["num_heads"]
    inner = args["intermediate_size"] or 2 * hidden_size
    tie_embeddings = args.get("tie_embeddings")
    if args["arch"] == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=inner,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=args["num_kv_heads"] or max(1, num_heads // 2),
                           max_position_embeddings=args["max_positions"],
                           tie_word_embeddings=bool(tie_embeddings), **ids)
    return GPT2Config(vocab_size=vocab, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=inner,
                      n_positions=args["max_positions"], tie_word_embeddings=tie_embeddings is not False, **ids)


def build_tiny_t5(
    path: str | Path,
    *,
    corpus: Sequence[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    dropout: float = 0.1,
    seed: int = 0,
) -> Path:
    """Builds (or reuses) a tiny T5 (encoder-decoder, tied embeddings) with its tokenizer in `path`.

    The tokenizer is built like T5's own (see `_train_t5_tokenizer`): newlines and runs of
    spaces collapse, and `{`, `}`, `<` are unknown, so it cannot write every answer as given.

    Args:
        path: Directory to write; created if missing.
        corpus: Texts the Unigram tokenizer is trained on (`{`, `}`, `<` are left out of it).
        vocab_size: Most tokenizer pieces (the corpus may yield fewer).
        d_model: Model width.
        num_layers: Encoder blocks and decoder blocks (each).
        num_heads: Attention heads.
        dropout: T5's `dropout_rate` (0.1 as in t5/flan-t5); 0 lets a model this small learn in fewer steps.
        seed: Seed for the random weights.

    Returns:
        The directory, loadable with `AutoModelForSeq2SeqLM.from_pretrained(path)`.
    """
    args = dict(kind="t5", tokenizer="unigram-words", corpus=list(corpus), vocab_size=vocab_size, d_model=d_model,
                num_layers=num_layers, num_heads=num_heads, seed=seed)
    if dropout != 0.1:  # only when set, so directories built before this option keep their fingerprint
        args["dropout"] = dropout
    path = Path(path)
    if _is_built(path, args):
        return path

    import torch
    from transformers import AutoModelForSeq2SeqLM, T5Config

    tokenizer = _train_t5_tokenizer(corpus, vocab_size)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model,
                      num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads,
                      dropout_rate=dropout, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(config)
    _save(path, model, tokenizer, args)
    return path


T5_UNKNOWN = "{}<"
"""Characters real T5 vocabularies lack; the tiny T5's tokenizer is trained without them."""


def _train_t5_tokenizer(corpus: Sequence[str], vocab_size: int):
    """A SentencePiece-style Unigram tokenizer built the way flan-t5's `tokenizer.json` is.

    Normalizer NFKC, then every run of whitespace (newlines and tabs included) becomes one
    space; pre-tokenizer WhitespaceSplit + Metaspace ("▁" prepended to every word); no byte
    fallback, so a character outside the vocabulary is `<unk>`. Specials pad=0, eos=1, unk=2,
    and `</s>` is appended to every encoded text.

    The pieces are what SentencePiece learns from a large corpus: frequent whole words
    ("▁answer", "▁##") and every single character, scored by log frequency. (EM training on a
    corpus this small keeps mostly characters, which no real T5 vocabulary looks like.)

    Example:
        "a\n\nb {x}" encodes as ▁a ▁b ▁ <unk> x <unk> and decodes as "a b x" (unk skipped).
    """
    import math
    from collections import Counter

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    texts = [normalizer.normalize_str("".join(c for c in text if c not in T5_UNKNOWN)) for text in corpus]
    words = Counter("▁" + w for text in texts for w in text.split())
    chars = Counter(c for text in texts for c in text.replace(" ", "▁"))
    total = sum(words.values()) + sum(chars.values())
    specials = ["<pad>", "</s>", "<unk>"]
    room = max(0, vocab_size - len(specials) - len(chars))
    pieces = dict(chars) | dict(words)
    kept = sorted(chars) + [w for w, _ in sorted(((w, n) for w, n in pieces.items() if w not in chars),
                                                  key=lambda x: (-x[1], x[0]))[:room]]
    vocab = [(t, 0.0) for t in specials] + [(t, math.log(pieces[t] / total)) for t in kept]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _train_tokenizer(corpus: Sequence[str], vocab_size: int, specials: list[str], eos: str,
                     split_spaces: bool = False):
    """A byte-level BPE (any text encodes, no unknowns) wrapped as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split_spaces:  # words, runs of digits, single punctuation marks and whitespace runs are apart
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"[^\W\d_]+|\d+|\s+|[^\w\s]+|_+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    extra = [s for s in specials if s not in SPECIALS]
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos, unk_token="<unk>",
                                   bos_token="<s>", additional_special_tokens=extra or None)


def _save(path: Path, model, tokenizer, args: dict) -> None:
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    (path / STAMP).unlink(missing_ok=True)
    model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(path)  # safetensors; tied weights are stored once
    tokenizer.save_pretrained(path)
    write_json(path / STAMP, {"fingerprint": fingerprint(args), "args": args})


def _is_built(path: Path, args: dict) -> bool:
    stamp = path / STAMP
    return stamp.exists() and read_json(stamp).get("fingerprint") == fingerprint(args)


def toy_records(n: int, seed: int = 0, predictor: str = "qa") -> list[dict]:
    """`n` finetuning records in DSPy ChatAdapter style (a word-echo task a tiny model learns fast).

    Each is `{"messages": [system, user, assistant], "predictor": predictor, "example_index": i}`,
    the shape of `data/{key}.jsonl`.
    """
    import random

    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "ocean", "pixel", "amber",
             "delta", "ember", "frost", "grape", "honey", "ivory"]
    rng = random.Random(seed)
    system = ("Your input fields are:\n1. `question` (str):\nYour output fields are:\n1. `answer` (str):\n"
              "In adhering to this structure, your objective is: Given the fields `question`, produce the fields `answer`.")
    rows = []
    for i in range(n):
        word = rng.choice(words)
        rows.append({"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"[[ ## question ## ]]\nRepeat the word {word}.\n\n"
                                        "Respond with the corresponding output fields, starting with the field "
                                        "`[[ ## answer ## ]]`, and then ending with the marker for `[[ ## completed ## ]]`."},
            {"role": "assistant", "content": f"[[ ## answer ## ]]\n{word}\n\n[[ ## completed ## ]]"},
        ], "predictor": predictor, "example_index": i})
    return rows
