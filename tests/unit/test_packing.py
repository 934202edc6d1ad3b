"""Packing changes no record's loss: records packed into one row give the losses they give alone, and a micro
batch packed gives the loss and gradients it gives one record a row."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from bootfinetune.config import TrainConfig
from bootfinetune.run.jsonio import write_jsonl
from bootfinetune.testing.tiny_models import build_tiny_causal, toy_records
from bootfinetune.training.answer_head import answer_logits_only
from bootfinetune.training.packing import collate_packed, micro_batch, pack_rows, packs_exactly
from bootfinetune.training.render import collate, encode_records
from bootfinetune.training.train_loop import to_device, train_loop

# fp32 losses near ln(vocab) ~ 6 differ between a row alone and a packed row only by the order of the
# float sums (other matmul and softmax shapes): a few ulps (1e-6) at most. A record that saw its
# neighbour (the control below) moves by 1e-3 and more even with random weights.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model_and_records(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = build_tiny_causal(tmp_path_factory.mktemp("pack") / "m")
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    model.config.use_cache = False  # as the engine sets it: a cache hides the packed rows' boundaries
    records = toy_records(6, seed=3)
    for r in records[::2]:  # uneven lengths
        r["messages"][-1]["content"] += " and some more words"
    encoded, _ = encode_records(tokenizer, records, "causal", 256)
    return target, tokenizer, model, encoded


def per_record_losses(logits, labels, lengths):
    token = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], reduction="none")
    out, offset = [], 0
    for n in lengths:
        scored = labels[0, offset + 1:offset + n] != -100
        out.append(float(token[offset:offset + n - 1][scored].mean()))
        offset += n
    return out


def test_each_record_has_the_same_loss_packed_and_alone(model_and_records):
    _, tokenizer, model, encoded = model_and_records
    lengths = [len(e.input_ids) for e in encoded]
    with torch.no_grad():
        alone = []
        for e in encoded:
            b = collate([e], tokenizer.pad_token_id)
            alone += per_record_losses(model(input_ids=b["input_ids"]).logits, b["labels"], [len(e.input_ids)])
        b = collate_packed([encoded], tokenizer.pad_token_id)
        packed = per_record_losses(model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits,
                                   b["labels"], lengths)
        # control: the same row with positions running on, so each record attends to those before it
        run_on = torch.arange(b["input_ids"].shape[1])[None]
        leaked = per_record_losses(model(input_ids=b["input_ids"], position_ids=run_on).logits, b["labels"], lengths)
    assert max(abs(a - p) for a, p in zip(alone, packed)) < TOLERANCE
    assert max(abs(a - p) for a, p in zip(alone[1:], leaked[1:])) > 100 * TOLERANCE


def test_the_answer_only_head_gives_the_records_mean_loss_on_packed_rows(model_and_records):
    target, tokenizer, model, encoded = model_and_records
    from transformers import AutoModelForCausalLM

    head = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    head.config.use_cache = False
    assert answer_logits_only(head)
    with torch.no_grad():
        sums, tokens = 0.0, 0
        for e in encoded:
            b = collate([e], tokenizer.pad_token_id)
            n = int((b["labels"][:, 1:] != -100).sum())
            sums, tokens = sums + float(model(**b).loss) * n, tokens + n
        rows = [encoded[:3], encoded[3:]]  # two rows, padded to one width
        loss = float(head(**to_device(collate_packed(rows, tokenizer.pad_token_id), "cpu", True)).loss)
    assert loss == pytest.approx(sums / tokens, abs=TOLERANCE)


def test_a_packed_micro_batch_gives_the_loss_and_gradients_of_the_unpacked_one(model_and_records):
    """The loop's default: the same micro batch, packed, is the same step (only the padding goes)."""
    target, tokenizer, model, _ = model_and_records
    records = toy_records(5, seed=4)
    records[0]["messages"][1]["content"] *= 4  # one long record: the others pack in pairs beside its width
    encoded, _ = encode_records(tokenizer, records, "causal", 1024)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])

    unpacked, real = micro_batch(encoded, tokenizer.pad_token_id, None, pack=False)
    packed, real_packed = micro_batch(encoded, tokenizer.pad_token_id, None, pack=True)
    assert packed["input_ids"].shape[0] == 3 and real_packed == real  # fewer rows, the same tokens
    assert packed["input_ids"].shape[1] == unpacked["input_ids"].shape[1]  # no wider
    alike, _ = micro_batch(encoded[1:], tokenizer.pad_token_id, None, pack=True)  # no two fit in one row:
    assert "attention_mask" in alike and alike["input_ids"].shape[0] == 4  # left as it is unpacked
    loss_u, grads_u = loss_and_grads(unpacked)
    loss_p, grads_p = loss_and_grads(packed)
    model.zero_grad()
    # fp32: the same tokens' losses summed in another order (other shapes): ulps, as for the records above
    assert loss_p == pytest.approx(loss_u, abs=TOLERANCE)
    assert float((grads_p - grads_u).abs().max()) < TOLERANCE * float(grads_u.abs().max())


def test_packing_is_used_only_where_transformers_builds_the_mask(model_and_records):
    assert packs_exactly(model_and_records[2])  # llama: masking_utils.create_causal_mask
    assert not packs_exactly(torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8)))


def test_rows_hold_every_record_once_within_the_length():
    rng = random.Random(0)
    lengths = [rng.randint(100, 400) for _ in range(500)]
    rows = pack_rows(lengths, capacity=1024, seed=1)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 1024 for r in rows)
    assert len(rows) < 1.1 * sum(lengths) / 1024  # nearly full rows
    assert pack_rows(lengths, 1024, seed=1) == rows
    assert pack_rows([2000, 10], capacity=1024, seed=0) == [[0], [1]]  # longer than a row: alone


def test_the_loop_trains_on_packed_rows(tmp_path, model_and_records):
    target = model_and_records[0]
    write_jsonl(tmp_path / "train.jsonl", toy_records(40, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", toy_records(8, seed=1))
    tc = TrainConfig(target=str(target), bsize=2, lr=3e-3, max_length=512, epochs=2)
    assert tc.packing  # the default
    state = train_loop({"target": str(target), "train": dataclasses.asdict(tc),
                        "train_path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "eval.jsonl")})
    assert state["engine"]["packed"] is True
    history = state["history"]
    assert state["global_step"] == 2 * 40 / 2  # each micro batch packed: the steps of a record a row
    assert all(h["padded_tokens"] < 0.2 * h["tokens"] for h in history)
    assert history[-1]["eval_loss"] < state["eval_loss_before"]
    # the same run unpacked (a padded record a row): the same loss at every optimizer step of the whole run
    unpacked = train_loop({"target": str(target), "train": dataclasses.asdict(dataclasses.replace(tc, packing=False)),
                           "train_path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "eval.jsonl")})
    assert unpacked["engine"]["packed"] is False and unpacked["global_step"] == state["global_step"]
    assert [p[0] for p in state["loss_curve"]] == [p[0] for p in unpacked["loss_curve"]]
    assert [p[1] for p in state["loss_curve"]] == pytest.approx([p[1] for p in unpacked["loss_curve"]], rel=1e-4)
    assert [h["eval_loss"] for h in history] == pytest.approx([h["eval_loss"] for h in unpacked["history"]], rel=1e-4)
