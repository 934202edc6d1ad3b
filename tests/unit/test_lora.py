"""LoRA in the training loop (one process): adapters train, the base stays, and both exports answer alike."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bootfinetune.config import TrainConfig
from bootfinetune.run.jsonio import write_jsonl
from bootfinetune.testing.tiny_models import build_tiny_causal, build_tiny_t5, toy_records
from bootfinetune.training.train_loop import train_loop


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("kind,zero_stage", [("causal", 2), ("causal", 3), ("seq2seq", 2), ("seq2seq", 3)])
def test_lora_trains_adapters_only_and_exports_adapter_and_merged_alike(tmp_path, kind, zero_stage):
    import torch
    from safetensors.torch import load_file

    from bootfinetune.training.export import export_checkpoint
    from bootfinetune.serving.lm import FinetunedEngine, load_model
    from bootfinetune.training.lora import adapter_base, is_adapter

    write_jsonl(tmp_path / "train.jsonl", toy_records(40, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", toy_records(8, seed=1))
    target = build_tiny_causal(tmp_path / "m") if kind == "causal" else build_tiny_t5(tmp_path / "m")
    tc = TrainConfig(target=str(target), bsize=8, lr=1e-2, max_length=256, epochs=4, lora=True, lora_r=8,
                     lora_alpha=16, lora_dropout=0.0, zero_stage=zero_stage)
    state = train_loop({"target": str(target), "train": dataclasses.asdict(tc),
                        "train_path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "eval.jsonl"),
                        "checkpoint_dir": str(tmp_path / "ckpt")})
    assert state["history"][-1]["eval_loss"] < 0.9 * state["eval_loss_before"], state["history"]

    exports = {}
    for how in ("adapter", "merged"):
        out = tmp_path / how
        facts = export_checkpoint(tmp_path / "ckpt" / "epoch_004", 4, str(target), kind, out,
                                  dataclasses.replace(tc, lora_export=how))
        assert facts["export"] == how and facts["adapter_parameters"] > 0
        exports[how] = out
    adapter = exports["adapter"]
    assert is_adapter(adapter) and adapter_base(adapter) == str(target)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)  # the adapter file holds adapters, not the base
    assert sum(v.numel() for v in weights.values()) == facts["adapter_parameters"]
    assert not is_adapter(exports["merged"]) and (exports["merged"] / "model.safetensors").exists()
    base_weights = load_file(str(target / "model.safetensors"))
    merged_weights = load_file(str(exports["merged"] / "model.safetensors"))
    changed = [k for k in base_weights if k in merged_weights and not torch.equal(base_weights[k], merged_weights[k])]
    assert changed, "merging the adapter changed no weight"
    for path in exports.values():
        (path / "manifest.json").write_text(json.dumps({"truncated": {"max_length": 256}}))
        load_model(str(target), "cpu")  # a tokenizer for the exports (the loop saved none here)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(target).save_pretrained(path)

    conversations = [r["messages"][:-1] for r in toy_records(6, seed=5)]
    answers = {how: FinetunedEngine(str(path), max_tokens=12).generate(conversations) for how, path in exports.items()}
    base_answers = FinetunedEngine(str(target), max_tokens=12).generate(conversations)
    assert answers["adapter"] == answers["merged"]
    assert answers["adapter"] != base_answers  # the adapter is really applied
