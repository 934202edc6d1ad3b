"""Packing: several causal records in one row, none attending to another, instead of one padded record a row.

DSPy's records are short and uneven (prompts of a hundred to a few hundred tokens, answers of tens),
so a row per record is mostly padding even in length buckets. `pack_rows` fills rows of
`max_length` tokens with whole records (first-fit over the records longest first, in a seeded
order); `collate_packed` lays them out with position ids that restart at 0 for each record and no
attention mask, which transformers turns into a block-diagonal causal mask (`masking_utils.
find_packed_sequence_indices`; the model must run without a KV cache, so the engine turns
`use_cache` off). Labels stay -100 over prompts and padding; each record's first label is set to -100,
the one a row of its own never uses either (the label shift), so no record is predicted from the one
before it. Seq2seq models have no such path: they keep one record a row (length buckets).
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from bootfinetune.training.render import IGNORE_INDEX, Encoded


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


def micro_batch(train_ex: Sequence[Encoded], rows: Sequence[Sequence[int]] | None, idx: Sequence[int], pad_id: int,
                multiple: int | None) -> tuple[dict[str, Any], int]:
    """The tensors of one micro batch and its real (non-padding) tokens: `idx` indexes packed rows when
    `rows` is given, else records (one a row, padded)."""
    from bootfinetune.training.render import collate

    if rows is None:
        batch = collate([train_ex[j] for j in idx], pad_id, multiple)
        return batch, int(batch["attention_mask"].sum())
    packed = [[train_ex[j] for j in rows[r]] for r in idx]
    return collate_packed(packed, pad_id, multiple), real_tokens(packed)


def unit_lengths(train_ex: Sequence[Encoded], rows: Sequence[Sequence[int]] | None) -> list[int]:
    """The length of each unit a micro batch is made of: a packed row, or a record."""
    if rows is None:
        return [len(e.input_ids) for e in train_ex]
    return [sum(len(train_ex[j].input_ids) for j in r) for r in rows]
