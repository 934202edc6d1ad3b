"""The training loop in one process, without Ray: the loss falls, checkpoints resume, options map to DeepSpeed."""

from __future__ import annotations

import dataclasses
import random

import pytest

from bootfinetune.config import TrainConfig
from bootfinetune.run.jsonio import write_jsonl
from bootfinetune.testing.tiny_models import build_tiny_causal, build_tiny_t5, toy_records
from bootfinetune.training.engine import deepspeed_config, lr_scheduler
from bootfinetune.training.train_loop import LoopConfig, length_batches, train_loop


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    write_jsonl(root / "train.jsonl", toy_records(40, seed=0))
    write_jsonl(root / "eval.jsonl", toy_records(8, seed=1))
    return root


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Torch threads follow OMP_NUM_THREADS in the loop; one keeps a shared 2-core box responsive."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _loop(target, data, **options):
    extra = {k: options.pop(k) for k in ("checkpoint_dir", "max_steps_per_epoch", "on_step") if k in options}
    tc = TrainConfig(target=str(target), bsize=8, lr=3e-3, max_length=256, **options)
    return train_loop({"target": str(target), "train": dataclasses.asdict(tc), "train_path": str(data / "train.jsonl"),
                       "eval_path": str(data / "eval.jsonl"), **extra})


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_loop_without_ray_loss_falls(tmp_path_factory, data, kind):
    root = tmp_path_factory.mktemp(kind)
    target = build_tiny_causal(root / "m") if kind == "causal" else build_tiny_t5(root / "m")
    state = _loop(target, data, epochs=3)
    history = state["history"]
    assert state["kind"] == kind and state["world_size"] == 1 and state["starts"] == [{"epoch": 0, "global_step": 0}]
    assert state["engine"]["zero_stage"] == 0 and state["engine"]["reason"].startswith("auto")  # one worker: plain
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["eval_loss"] < 0.8 * state["eval_loss_before"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert state["global_step"] == 3 * 5  # 40 records / bsize 8, accumsteps 1
    assert all(h["answer_tokens"] > 0 and h["tokens"] > h["answer_tokens"] for h in history)
    assert state["truncated_train"] == 0


def test_loop_resumes_from_its_last_checkpoint_not_step_zero(tmp_path, data):
    target = build_tiny_causal(tmp_path / "m", arch="gpt2", chat_template=False)
    ckpt = tmp_path / "ckpt"
    first = _loop(target, data, epochs=1, checkpoint_dir=str(ckpt))
    assert (ckpt / "epoch_001" / "trainer_state.json").exists()
    second = _loop(target, data, epochs=2, checkpoint_dir=str(ckpt))
    assert second["starts"] == [{"epoch": 0, "global_step": 0}, {"epoch": 1, "global_step": first["global_step"]}]
    assert second["history"][0] == first["history"][0]  # epoch 1 was not run again
    assert second["global_step"] == 2 * first["global_step"]
    assert second["history"][1]["eval_loss"] < first["history"][0]["eval_loss"]
    again = _loop(target, data, epochs=2, checkpoint_dir=str(ckpt))  # finished: nothing to do
    assert again["starts"] == second["starts"] and again["history"] == second["history"]


@pytest.mark.parametrize("accumsteps,bf16", [(1, False), (2, False), (1, True)])
def test_the_plain_engine_trains_as_deepspeed_stage_0(tmp_path, data, accumsteps, bf16):
    """auto on one worker trains without DeepSpeed (`torch_engine`); the losses, step counts, lr and
    exported weights are those of DeepSpeed's stage-0 engine on the same data and seed (fp32, gradient
    clipping on: max_grad_norm 0.05 clips every step here; accumulation over 2 micro batches). With bf16,
    DeepSpeed keeps bf16 weights beside fp32 masters where ours computes under autocast from fp32 weights:
    the losses then agree to bf16's precision only (2e-2)."""
    import torch

    from bootfinetune.training.export import consolidated_state_dict

    target = build_tiny_causal(tmp_path / "m")
    opts = dict(epochs=2, accumsteps=accumsteps, bf16=bf16, max_grad_norm=0.05)
    plain = _loop(target, data, checkpoint_dir=str(tmp_path / "plain"), **opts)
    ds = _loop(target, data, checkpoint_dir=str(tmp_path / "ds"), zero_stage=0, **opts)
    assert plain["engine"]["engine"] == "torch" and ds["engine"]["engine"] == "deepspeed"
    assert plain["global_step"] == ds["global_step"] == 2 * (5 // accumsteps)
    tol = 2e-2 if bf16 else 1e-5
    # the whole run, optimizer step by optimizer step (the loss curve has a point per step on a run this short)
    assert [p[0] for p in plain["loss_curve"]] == [p[0] for p in ds["loss_curve"]] == list(range(1, plain["global_step"] + 1))
    assert [p[1] for p in plain["loss_curve"]] == pytest.approx([p[1] for p in ds["loss_curve"]], rel=tol)
    for a, b in zip(plain["history"], ds["history"]):
        assert a["steps"] == b["steps"] and a["tokens"] == b["tokens"] and a["lr"] == pytest.approx(b["lr"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=tol)
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=tol)
    if not bf16:  # the export reads both checkpoints alike (stage 0's layout), to the same weights
        ours = consolidated_state_dict(tmp_path / "plain" / "epoch_002" / "deepspeed", "epoch_2", 0)
        theirs = consolidated_state_dict(tmp_path / "ds" / "epoch_002" / "deepspeed", "epoch_2", 0)
        assert ours.keys() == theirs.keys()
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)


class _StopInThirdEpoch:
    """`on_step`: raises at the first micro batch of the third epoch, once (the run dies after two checkpoints)."""

    def __init__(self):
        self.fired = False

    def __call__(self, step) -> None:
        if step.epoch == 2 and not self.fired:
            self.fired = True
            raise RuntimeError("stopped")


def test_the_plain_engine_resumes_where_an_uninterrupted_run_is(tmp_path, data):
    """A run stopped in its third epoch and started again (from the second epoch's checkpoint: weights, AdamW
    moments, schedule, step count) gives the losses of the run that was never stopped (a Llama without dropout:
    no random draws in the steps)."""
    target = build_tiny_causal(tmp_path / "m")
    whole = _loop(target, data, epochs=3, checkpoint_dir=str(tmp_path / "whole"))
    with pytest.raises(RuntimeError, match="stopped"):
        _loop(target, data, epochs=3, checkpoint_dir=str(tmp_path / "cut"), on_step=_StopInThirdEpoch())
    resumed = _loop(target, data, epochs=3, checkpoint_dir=str(tmp_path / "cut"))
    assert resumed["engine"]["engine"] == "torch" and resumed["starts"][-1] == {"epoch": 2, "global_step": 10}
    assert resumed["global_step"] == whole["global_step"] == 15
    last, again = whole["history"][-1], resumed["history"][-1]
    assert again["train_loss"] == pytest.approx(last["train_loss"], rel=1e-5)
    assert again["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5) and again["lr"] == last["lr"]


def test_length_batches_cover_every_index_once_and_cut_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    batches = length_batches(lengths, bsize=8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) == 8 for b in batches)
    assert length_batches(lengths, 8, seed=1) == batches and length_batches(lengths, 8, seed=2) != batches

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    in_order = [list(range(i, i + 8)) for i in range(0, 1000, 8)]
    assert padding(batches) < 0.2 * padding(in_order)


def test_deepspeed_config_follows_the_options():
    tc = TrainConfig(bsize=4, accumsteps=3, bf16=True, zero_stage=3, offload_optimizer=True, offload_params=True,
                     max_grad_norm=0.5)
    ds = deepspeed_config(tc, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "optimizer" not in ds and "scheduler" not in ds  # torch AdamW is handed in instead
    plain = deepspeed_config(TrainConfig(zero_stage=2), world_size=1)["zero_optimization"]
    assert plain == {"stage": 2}
    with pytest.raises(ValueError, match="auto"):  # the default is resolved by the loop first (engine_choice)
        deepspeed_config(TrainConfig(), world_size=1)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_warms_up_then_follows_the_schedule(schedule):
    import torch

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_scheduler(opt, TrainConfig(lr=1.0, warmup_ratio=0.2, lr_schedule=schedule), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == 0.5 and lrs[2] == 1.0
    if schedule == "constant":
        assert lrs[2:] == [1.0] * 8
    else:
        assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.3


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("total, ratio", [(10, 0.2), (37, 0.05), (5, 0.0)])
def test_lr_schedule_matches_the_hugging_face_one_of_its_name(schedule, total, ratio):
    """Ours is written out so that workers need not import transformers' Trainer modules; the lr at every step
    is the one `transformers.get_scheduler` gives for the same name, warmup and length."""
    import math

    import torch
    from transformers import get_scheduler

    def lrs(make) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched, out = make(opt), []
        for _ in range(total + 2):  # and past the end, where linear and cosine stay at 0
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: lr_scheduler(o, TrainConfig(lr=0.5, warmup_ratio=ratio, lr_schedule=schedule), total))
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[schedule]
    theirs = lrs(lambda o: get_scheduler(name, o, num_warmup_steps=math.ceil(ratio * total), num_training_steps=total))
    assert ours == pytest.approx(theirs, abs=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_run_with_our_schedule_trains_as_one_with_the_hugging_face_schedule(tmp_path, data, monkeypatch, schedule):
    """Not just the lr at each step: a whole short run (3 epochs, every optimizer step) gives the same losses with
    our schedule as with `transformers.get_scheduler`'s of the same name in its place."""
    import math

    from transformers import get_scheduler

    from bootfinetune.training import engine

    target = build_tiny_causal(tmp_path / "m")
    opts = dict(epochs=3, warmup_ratio=0.2, lr_schedule=schedule)
    ours = _loop(target, data, **opts)

    def theirs(optimizer, tc, total_steps):
        return get_scheduler(schedule, optimizer, num_warmup_steps=math.ceil(tc.warmup_ratio * total_steps),
                             num_training_steps=total_steps)

    monkeypatch.setattr(engine, "lr_scheduler", theirs)
    hf = _loop(target, data, **opts)
    assert len(ours["loss_curve"]) == ours["global_step"] == 15
    assert [p[1] for p in ours["loss_curve"]] == pytest.approx([p[1] for p in hf["loss_curve"]], rel=1e-6)
    assert [h["eval_loss"] for h in ours["history"]] == pytest.approx([h["eval_loss"] for h in hf["history"]], rel=1e-6)
    assert [h["lr"] for h in ours["history"]] == pytest.approx([h["lr"] for h in hf["history"]], abs=1e-12)


def test_the_loss_curve_does_not_depend_on_when_progress_was_reported(tmp_path, data, monkeypatch):
    """A seeded run gives the same loss curve whether progress lines came at every step or never (200 steps:
    a point every 2 optimizer steps, so a progress line between two points must not cut the mean short)."""
    from bootfinetune.training import progress

    target = build_tiny_causal(tmp_path / "m")
    tc = TrainConfig(target=str(target), bsize=1, lr=1e-3, max_length=256, epochs=5)
    runs = []
    for every in (0.0, 1e9):
        monkeypatch.setattr(progress, "LOG_EVERY_S", every)
        runs.append(train_loop({"target": str(target), "train": dataclasses.asdict(tc),
                                "train_path": str(data / "train.jsonl")}))
    often, never = runs
    assert often["global_step"] == 200 and [p[0] for p in often["loss_curve"]] == list(range(2, 201, 2))
    assert often["loss_curve"] == never["loss_curve"]
    assert [h["train_loss"] for h in often["history"]] == [h["train_loss"] for h in never["history"]]


def test_unknown_loop_config_key_is_refused():
    with pytest.raises(ValueError, match="unknown loop_config keys"):
        LoopConfig.from_dict({"target": "x", "train": {}, "bogus": 1})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answer_logits_only_gives_the_full_forward_loss_and_gradients(tmp_path, arch):
    """The head on answer positions only: the same loss and gradients as the full forward, on a ragged batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bootfinetune.training.render import collate, encode_records
    from bootfinetune.training.answer_head import answer_logits_only, answer_positions

    target = build_tiny_causal(tmp_path / arch, arch=arch)
    tokenizer = AutoTokenizer.from_pretrained(target)
    encoded, _ = encode_records(tokenizer, toy_records(5, seed=3), "causal", 256)
    batch = collate(encoded, tokenizer.pad_token_id or 0)
    assert (batch["attention_mask"] == 0).any(), "the batch should be ragged (right padding)"

    def loss_and_grads(patch: bool, host_index: bool = False):
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        if patch:
            assert answer_logits_only(model) is True
        extra = {"answer_index": answer_positions(batch["labels"])} if host_index else {}
        loss = model(**batch, **extra).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full_loss, full_grads = loss_and_grads(False)
    for host_index in (False, True):  # the index found on the device, or handed in as the loop does
        fast_loss, fast_grads = loss_and_grads(True, host_index)
        assert torch.allclose(full_loss, fast_loss, atol=1e-5), (full_loss, fast_loss)
        assert full_grads.keys() == fast_grads.keys()
        worst = max(float((full_grads[n] - fast_grads[n]).abs().max()) for n in full_grads)
        assert worst < 1e-5, worst


def test_answer_logits_only_leaves_other_heads_alone(tmp_path):
    """A seq2seq model (or any architecture outside the allowlist) keeps its own forward."""
    from transformers import AutoModelForSeq2SeqLM

    from bootfinetune.training.answer_head import answer_logits_only

    model = AutoModelForSeq2SeqLM.from_pretrained(build_tiny_t5(tmp_path / "t5"))
    assert answer_logits_only(model) is False
    assert "forward" not in vars(model)


def test_compiled_layers_train_as_the_eager_ones(tmp_path, data):
    import logging

    records, handler = [], logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("bootfinetune.training.engine")
    saved = (logger.level, logger.disabled)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.disabled = False
    try:
        target = build_tiny_causal(tmp_path / "m", num_layers=1)
        eager = _loop(target, data, epochs=1, max_steps_per_epoch=2)
        compiled = _loop(target, data, epochs=1, max_steps_per_epoch=2, compile_layers=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.disabled = saved[1]
    said = [r.getMessage() for r in records]
    assert any(m.startswith("compile_layers: 1 LlamaDecoderLayer block(s) compiled") for m in said), said
    # Inductor fuses and reorders float32 arithmetic: the same steps, to rounding.
    assert compiled["history"][0]["train_loss"] == pytest.approx(eager["history"][0]["train_loss"], rel=1e-4)
    assert compiled["history"][0]["eval_loss"] == pytest.approx(eager["history"][0]["eval_loss"], rel=1e-4)
