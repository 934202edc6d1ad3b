"""Tokens added so that every answer survives the target's tokenizer: encode/decode as inference does,
the added tokens themselves, and the embedding rows they need.

`stages/token_plan.py` decides which tokens a model key needs, before training; the training worker
adds them (`add_answer_tokens`) and gives them embedding rows (`fit_embeddings`), and every loader of
an exported model reads the extended tokenizer it carries.
"""

from __future__ import annotations

from typing import Any, Iterable

from bootfinetune.training.render import decode_answer


def roundtrip(tokenizer: Any, text: str) -> str:
    """`text` encoded as an answer and decoded as inference decodes it."""
    return decode_answer(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def add_answer_tokens(tokenizer: Any, tokens: Iterable[str]) -> int:
    """Adds `tokens` to `tokenizer` as plain (not special) tokens the normalizer leaves alone.

    Returns:
        How many were new.
    """
    from tokenizers import AddedToken

    tokens = list(tokens)
    if not tokens:
        return 0
    return tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in tokens])


def fit_embeddings(model: Any, tokenizer: Any, base_size: int) -> int:
    """Gives `model` an embedding row for every token of `tokenizer`; rows of added tokens start at the mean.

    A model whose embedding matrix already has spare rows (T5 checkpoints have 28) keeps its size
    and the added tokens take spare rows; otherwise the matrix grows. Either way the rows from
    `base_size` on (the tokens added to a tokenizer of that length) are set to the mean of the
    rows before them, so a new token starts as an average word rather than noise.

    Returns:
        The embedding rows now.
    """
    import contextlib

    import torch

    def shape(weight: Any) -> tuple:  # a ZeRO-3 partitioned parameter keeps its full shape in ds_shape
        return tuple(getattr(weight, "ds_shape", weight.shape))

    rows = shape(model.get_input_embeddings().weight)[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        rows = len(tokenizer)
    if len(tokenizer) <= base_size:
        return rows
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:
        weights.append(out.weight)
    gathered = contextlib.nullcontext()
    if any(hasattr(w, "ds_id") for w in weights):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    with gathered, torch.no_grad():
        for weight in weights:
            weight[base_size:len(tokenizer)] = weight[:base_size].mean(dim=0, keepdim=True)
    return rows
