"""zero_stage="auto": the engine follows the memory estimate, a given stage wins, no JIT-built comm op."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bootfinetune.config import TrainConfig
from bootfinetune.training.engine_choice import (HEADROOM, _ladder, choose_engine, count_parameters,
                                                 model_state_bytes)

GB = 10**9
H100 = 80 * 2**30


@pytest.mark.parametrize("params,trainable,world,bf16,expected", [
    (0.5e9, 0.5e9, 1, True, (0, False, False)),   # 8 GB of states on one 80 GiB GPU: plain
    (7e9, 7e9, 1, True, (2, True, False)),        # 112 GB: only the optimizer offloaded fits (28 GB left)
    (7e9, 40e6, 1, True, (0, False, False)),      # LoRA on 7B: 14 GB of frozen weights, tiny optimizer
    (7e9, 7e9, 8, True, (1, False, False)),       # 14 + 14 + 84/8 GB: ZeRO-1 fits
    (13e9, 13e9, 8, True, (3, False, False)),     # ZeRO-1 71.5 GB, ZeRO-2 48.8 GB, ZeRO-3 26 GB
    (70e9, 70e9, 8, True, (3, True, False)),      # ZeRO-3 140 GB; optimizer offloaded 35 GB
    (1.5e9, 1.5e9, 2, False, (1, False, False)),  # fp32: 6 + 6 + 12/2 = 18 GB
])
def test_auto_follows_the_memory_estimate(params, trainable, world, bf16, expected):
    tc = TrainConfig(bf16=bf16)
    choice = choose_engine(tc, int(params), int(trainable), world, H100)
    assert (choice.zero_stage, choice.offload_optimizer, choice.offload_params) == expected
    assert choice.estimate_bytes == model_state_bytes(int(params), int(trainable), bf16=bf16, world=world,
                                                      stage=expected[0], offload_optimizer=expected[1],
                                                      offload_params=expected[2])
    assert choice.estimate_bytes <= HEADROOM * H100 and choice.memory_bytes == H100
    assert choice.reason.startswith("auto") and f"on {world} worker" in choice.reason


def test_auto_takes_the_least_sharding_that_fits_over_a_grid():
    tc = TrainConfig(bf16=True)
    for params in (1e6, 1e8, 5e8, 1.5e9, 3e9, 8e9, 14e9, 34e9, 72e9, 180e9):
        for world in (1, 2, 4, 8, 16):
            for memory in (8 * 2**30, H100):
                choice = choose_engine(tc, int(params), int(params), world, memory)
                ladder = _ladder(world)
                picked = ladder.index((choice.zero_stage, choice.offload_optimizer, choice.offload_params))
                need = [model_state_bytes(int(params), int(params), bf16=True, world=world, stage=s,
                                          offload_optimizer=o, offload_params=p) for s, o, p in ladder]
                if need[picked] <= HEADROOM * memory:
                    assert all(n > HEADROOM * memory for n in need[:picked]), (params, world, memory)
                else:  # nothing fits: the most sharded, and the reason says so
                    assert picked == len(ladder) - 1 and "do not fit" in choice.reason


def test_one_worker_never_gets_a_stage_that_shards_nothing():
    assert [s for s, o, p in _ladder(1) if not (o or p)] == [0]
    assert _ladder(4)[0] == (1, False, False)  # several workers: ZeRO-1, weights and gradients whole


def test_the_plain_engine_is_only_for_one_worker_with_nothing_to_shard():
    """auto on one worker whose states fit: torch without DeepSpeed; a given stage (0 too), several workers or
    offload keep DeepSpeed."""
    assert choose_engine(TrainConfig(), 10**6, 10**6, 1, H100).engine == "torch"
    assert "plain torch" in choose_engine(TrainConfig(), 10**6, 10**6, 1, H100).describe()
    assert choose_engine(TrainConfig(zero_stage=0), 10**6, 10**6, 1, H100).engine == "deepspeed"
    assert choose_engine(TrainConfig(), 10**6, 10**6, 2, H100).engine == "deepspeed"
    assert choose_engine(TrainConfig(bf16=True), int(7e9), int(7e9), 1, H100).engine == "deepspeed"  # offloaded
    assert choose_engine(TrainConfig(offload_optimizer=True), 10**6, 10**6, 1, H100).engine == "deepspeed"


def test_a_given_stage_or_offload_wins():
    huge = int(1e12)
    given = choose_engine(TrainConfig(zero_stage=1), huge, huge, 2, 2**30)
    assert (given.zero_stage, given.offload_optimizer, given.estimate_bytes) == (1, False, None)
    assert given.reason == "zero_stage=1 given"
    tiny = choose_engine(TrainConfig(zero_stage=3, offload_optimizer=True), 1000, 1000, 1, H100)
    assert (tiny.zero_stage, tiny.offload_optimizer, tiny.offload_params) == (3, True, False)
    kept = choose_engine(TrainConfig(offload_params=True), 1000, 1000, 1, H100)  # auto, offload_params asked
    assert (kept.zero_stage, kept.offload_params) == (3, True)
    kept = choose_engine(TrainConfig(offload_optimizer=True), 1000, 1000, 4, H100)
    assert (kept.zero_stage, kept.offload_optimizer) == (1, True)


@pytest.mark.parametrize("lora", [False, True])
def test_parameters_are_counted_as_the_loop_trains_them(tmp_path, lora):
    import torch
    from transformers import AutoModelForCausalLM

    from bootfinetune.testing.tiny_models import build_tiny_causal
    from bootfinetune.training.lora import apply_lora

    target = build_tiny_causal(tmp_path / "m")
    tc = TrainConfig(target=str(target), lora=lora, lora_r=4)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    if lora:
        model = apply_lora(model, tc, "causal")
    real = list(model.parameters())
    assert count_parameters(str(target), "causal", tc) == (
        sum(p.numel() for p in real), sum(p.numel() for p in real if p.requires_grad))


def test_the_process_group_builds_no_shared_memory_op(tmp_path):
    """A fresh JIT cache stays empty: DeepSpeed's CPU shm op (a minute or more of C++ per venv) is not built.
    The process group itself does not import DeepSpeed (the plain engine never needs it); its backend is made
    over that group when a DeepSpeed engine is built."""
    code = ("import sys\n"
            "from bootfinetune.training.distributed import deepspeed_comm, process_group\n"
            "with process_group(ray=False, use_gpu=False) as (rank, world, dev):\n"
            "    assert (rank, world) == (0, 1) and 'deepspeed' not in sys.modules\n"
            "    deepspeed_comm(use_gpu=False)\n"
            "    import deepspeed.comm.comm as c\n"
            "    assert c.cdb.shm_comm_op is None and c.cdb.is_initialized()\n"
            "print('ok')\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").iterdir())


QWEN_1_5B = {"hidden": 1536, "intermediate": 8960, "layers": 28, "vocab": 151936}


@pytest.mark.parametrize("bsize,seq,expected", [
    (4, 512, False),    # 2k tokens: ~6 GiB of activations beside 21 GiB of bf16 states: room to spare
    (8, 1024, False),   # 8k tokens: ~23 GiB still fit in the ~50 GiB the states leave
    (32, 1024, True),   # 32k tokens: ~93 GiB do not; checkpointing keeps ~6 GiB
    (64, 2048, True),   # 131k tokens: do not fit even checkpointed: on, and the reason says out-of-memory
])
def test_gradient_checkpointing_auto_follows_the_activation_estimate(bsize, seq, expected):
    from bootfinetune.training.engine_choice import activation_bytes, choose_checkpointing

    tc = TrainConfig(bf16=True)
    engine = choose_engine(tc, int(1.78e9), int(1.78e9), 1, H100)
    micro, head = bsize * seq, bsize * 32  # answers of 32 tokens get logits
    choice = choose_checkpointing(tc, engine, QWEN_1_5B, micro, head)
    assert choice.gradient_checkpointing is expected and choice.checkpointing_reason.startswith("auto")
    plain = activation_bytes(QWEN_1_5B, micro, head, bf16=True, checkpointing=False)
    room = 0.9 * H100 - engine.estimate_bytes
    assert choice.activation_bytes == plain and (plain > room) is expected  # on exactly when they do not fit
    saved = activation_bytes(QWEN_1_5B, micro, head, bf16=True, checkpointing=True)
    assert saved < plain / 4
    assert ("out-of-memory" in choice.checkpointing_reason) is (saved > room)
    assert ("checkpointing on" if expected else "checkpointing off") in choice.describe()


def test_a_given_gradient_checkpointing_wins_and_cpu_memory_leaves_it_off():
    from bootfinetune.training.engine_choice import choose_checkpointing, micro_sizes

    engine = choose_engine(TrainConfig(), 500_000, 500_000, 1, 8 * 2**30)
    for given in (True, False):
        choice = choose_checkpointing(TrainConfig(gradient_checkpointing=given), engine, QWEN_1_5B, 10**6, 10**6)
        assert choice.gradient_checkpointing is given and "given" in choice.checkpointing_reason
    # The demo's shape on an 8 GiB host: 8 records of <= 96 tokens is nothing to checkpoint.
    tiny = {"hidden": 96, "intermediate": 256, "layers": 4, "vocab": 1024}
    micro = micro_sizes([96] * 20, [12] * 20, bsize=8, answers_only=True)
    assert micro == (768, 96)
    assert choose_checkpointing(TrainConfig(), engine, tiny, *micro).gradient_checkpointing is False


def test_model_dims_read_llama_gpt2_and_t5_configs(tmp_path):
    from transformers import GPT2Config, LlamaConfig, T5Config

    from bootfinetune.training.engine_choice import model_dims

    LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=3, vocab_size=500).save_pretrained(tmp_path / "l")
    GPT2Config(n_embd=32, n_layer=2, vocab_size=300).save_pretrained(tmp_path / "g")
    T5Config(d_model=48, d_ff=96, num_layers=2, num_decoder_layers=3, vocab_size=400).save_pretrained(tmp_path / "t")
    tc = TrainConfig()
    assert model_dims(str(tmp_path / "l"), tc) == {"hidden": 64, "intermediate": 176, "layers": 3, "vocab": 500}
    assert model_dims(str(tmp_path / "g"), tc) == {"hidden": 32, "intermediate": 128, "layers": 2, "vocab": 300}
    assert model_dims(str(tmp_path / "t"), tc) == {"hidden": 48, "intermediate": 96, "layers": 5, "vocab": 400}
