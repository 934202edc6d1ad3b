"""The training loop on one GPU without Ray: bf16, ZeRO-2, NCCL (skipped without CUDA)."""

from __future__ import annotations

import dataclasses

import pytest

from bootfinetune.config import TrainConfig
from bootfinetune.run.jsonio import write_jsonl
from bootfinetune.testing.tiny_models import build_tiny_causal, toy_records
from bootfinetune.training.train_loop import train_loop


@pytest.mark.gpu
def test_loop_on_gpu_bf16_zero2_loss_falls(tmp_path):
    import torch

    target = build_tiny_causal(tmp_path / "m")
    write_jsonl(tmp_path / "train.jsonl", toy_records(64, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", toy_records(16, seed=1))
    tc = TrainConfig(target=str(target), bsize=8, lr=3e-3, epochs=3, max_length=256, bf16=True, zero_stage=2,
                     use_gpu=True)
    torch.cuda.reset_peak_memory_stats()
    state = train_loop({"target": str(target), "train": dataclasses.asdict(tc),
                        "train_path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "eval.jsonl"),
                        "checkpoint_dir": str(tmp_path / "ckpt")})
    history = state["history"]
    assert history[-1]["eval_loss"] < 0.8 * state["eval_loss_before"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert torch.cuda.max_memory_allocated() > 0  # it really ran on the GPU
    assert (tmp_path / "ckpt" / "epoch_003" / "trainer_state.json").exists()
