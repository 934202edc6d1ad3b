"""Packing: a micro batch's causal records in as few rows as fit, none attending to another, instead of one
padded record a row.

DSPy's records are short and uneven (prompts of a hundred to a few hundred tokens, answers of tens),
so a row per record carries padding even in length buckets. `micro_batch` packs the `bsize` records
of a micro batch into rows no longer than its longest record (`pack_rows`: first-fit, longest first) and
`collate_packed` lays them out with position ids that restart at 0 for each record and no attention
mask, which transformers turns into a block-diagonal causal mask (`masking_utils.
find_packed_sequence_indices`; the model must run without a KV cache, so the engine turns `use_cache`
off). Labels stay -100 over prompts and padding; each record's first label is set to -100, the one a
row of its own never uses either (the label shift), so no record is predicted from the one before it.

The micro batch keeps its records, so the step count, the records per step and the loss (the mean
over the same answer tokens) are those of the unpacked loop: packing is exact per step, not only per
record, and a packed micro batch is never larger than the padded one (no more rows, none wider), so the
memory a user sized `bsize` for holds; only its padding goes. Rows as wide as `max_length` would pack more
records together but make the batch wider than a length bucket's (more attention work, more memory).
Rows of `max_length` filled from the whole epoch (TRL's packing) would instead make fewer, larger steps.
Seq2seq models have no such path, nor have models whose mask transformers does not build
(`packs_exactly`): they keep one record a row (length buckets).
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from bootfinetune.training.render import Encoded, IGNORE_INDEX, collate


def pack_rows(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Rows of record indices whose lengths add up to at most `capacity` (a longer record gets a row of
    its own): first-fit decreasing, with ties in a seeded order.

    Example:
        >>> sorted(sorted(r) for r in pack_rows([5, 3, 2, 6, 4], capacity=10, seed=0))
        [[0, 1, 2], [3, 4]]
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(rows: Sequence[Sequence[Encoded]], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Packed rows as tensors: input_ids, labels and position_ids (restarting per record), no attention mask.

    Example:
        >>> b = collate_packed([[Encoded([5, 6], [-100, 6], False), Encoded([7, 8, 9], [8, 8, 9], False)]], pad_id=0)
        >>> b["input_ids"].tolist(), b["position_ids"].tolist(), b["labels"].tolist()
        ([[5, 6, 7, 8, 9]], [[0, 1, 0, 1, 2]], [[-100, 6, -100, 8, 9]])
    """
    import torch

    ids, labels, positions = [], [], []
    for row in rows:
        ids.append([t for e in row for t in e.input_ids])
        labels.append([t for e in row for t in [IGNORE_INDEX, *e.labels[1:]]])
        positions.append([p for e in row for p in range(len(e.input_ids))])
    width = max(len(r) for r in ids)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    def pad(rows_: list[list[int]], value: int | None) -> "torch.Tensor":
        # padding is a segment of its own: its positions restart at 0 too
        return torch.tensor([r + ([value] * (width - len(r)) if value is not None else list(range(width - len(r))))
                             for r in rows_], dtype=torch.long)

    return {"input_ids": pad(ids, pad_id), "labels": pad(labels, IGNORE_INDEX), "position_ids": pad(positions, None)}


def real_tokens(rows: Sequence[Sequence[Encoded]]) -> int:
    """Tokens of the records in packed rows (what an attention mask would count)."""
    return sum(len(e.input_ids) for row in rows for e in row)


def micro_batch(records: Sequence[Encoded], pad_id: int, multiple: int | None,
                pack: bool) -> tuple[dict[str, Any], int]:
    """The tensors of one micro batch and its real (non-padding) tokens: the records one a row, padded, or
    (`pack`) in as few rows as first-fit finds, none longer than the batch's longest record, so the packed
    batch is never larger than the padded one, in rows, width or attention. Packed or not, it scores the
    same answer tokens: the same loss and gradients, only the padding goes. A batch where no two records
    share a row (a tight length bucket) stays as it is unpacked: padded, with its attention mask.

    Example:
        >>> recs = [Encoded([5, 6, 7, 8], [-100] * 4, False)] + [Encoded([5, 6], [-100, 6], False)] * 2
        >>> b, real = micro_batch(recs, pad_id=0, multiple=None, pack=True)
        >>> b["input_ids"].tolist(), real
        ([[5, 6, 7, 8], [5, 6, 5, 6]], 8)
    """
    lengths = [len(e.input_ids) for e in records]
    rows = pack_rows(lengths, max(lengths), seed=0) if pack else []
    if len(rows) == len(records) or not pack:  # nothing to pack together (e.g. a tight length bucket)
        batch = collate(list(records), pad_id, multiple)
        return batch, int(batch["attention_mask"].sum())
    packed = [[records[j] for j in row] for row in rows]
    return collate_packed(packed, pad_id, multiple), real_tokens(packed)


def packs_exactly(model: Any) -> bool:
    """Whether `model` keeps packed records apart: its attention mask comes from transformers'
    `masking_utils.create_causal_mask`, which makes position ids that restart per record a block-diagonal
    mask (or a varlen call with flash attention). Models with their own mask code (remote code, older
    architectures) would let a record see the one before it: they keep a record a row."""
    import sys

    return any(hasattr(sys.modules.get(type(m).__module__), "create_causal_mask") for m in model.modules())
