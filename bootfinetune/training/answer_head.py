"""The answer-only LM head: logits where the loss needs them, not over the whole prompt.

A finetuning example is mostly prompt, whose labels are -100; `answer_logits_only` makes a
plain causal model's training forward apply its head at answer positions only, with the same
loss. The training loop installs it and hands `answer_positions` over from the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "olmo",
                                    "olmo2", "starcoder2", "smollm3"})
"""Causal architectures whose logits are exactly `lm_head(last hidden state)`: no soft-capping,
scaling or auxiliary loss (checked against their transformers forward)."""


def answer_logits_only(model: Any) -> bool:
    """Makes `model(input_ids, attention_mask, labels)` run the LM head on answer positions only.

    A finetuning example is mostly prompt, whose labels are -100, yet a plain forward
    computes (and keeps, for backward) float logits over the whole vocabulary at every
    position: for a 150k vocabulary that is most of the activation memory and a sixth of the
    FLOPs of a 1.5B model. This forward takes the base model's hidden states, keeps the
    positions whose next token is an answer token and applies the head there; the loss is
    the same mean cross-entropy the full forward gives. It replaces `forward` on this
    instance only, so DeepSpeed's hooks, saving and generation are untouched, and calls
    without labels take the original path. Returns False (nothing changed) for architectures
    outside `PLAIN_HEAD_MODEL_TYPES`.
    """
    import torch.nn.functional as F

    head, base = model.get_output_embeddings(), model.base_model
    if model.config.model_type not in PLAIN_HEAD_MODEL_TYPES or head is None or base is model:
        return False
    full_forward = model.forward

    def forward(input_ids=None, attention_mask=None, labels=None, answer_index=None, **kwargs):
        if labels is None:
            return full_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)[0]
        if answer_index is None:  # computed here, a device sync; the loop passes it ready-made
            answer_index = answer_positions(labels)
        flat_labels = labels.reshape(-1)
        logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, answer_index)).float()
        return AnswerLoss(F.cross_entropy(logits, flat_labels.index_select(0, answer_index + 1)))

    model.forward = forward
    return True


def answer_positions(labels: Any) -> Any:
    """Flat indices (into batch x sequence) of the positions whose next token is an answer token.

    >>> import torch
    >>> answer_positions(torch.tensor([[-100, -100, 7, 8], [-100, 9, -100, -100]])).tolist()
    [1, 2, 4]
    """
    import torch

    width = labels.shape[1]
    rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    return rows * width + cols


@dataclass
class AnswerLoss:
    """What the answer-only forward returns: the loss, where a model output has it."""

    loss: Any
