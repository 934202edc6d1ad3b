"""LoRA adapters (PEFT): training them, exporting them, and merging them into full models.

With `lora=True` the training loop wraps the target in a PEFT model whose base weights are
frozen; only the low-rank adapters train (and only they are in the optimizer, so ZeRO
shards and offloads a few megabytes instead of the whole model). The export
(`models/{key}/`) is then, by `lora_export`:

- "adapter": PEFT's own format (`adapter_config.json`, `adapter_model.safetensors`) plus the
  tokenizer and the manifest. `adapter_config.json` names the base (the `target`), so
  `PeftModel.from_pretrained`, `vllm serve --lora-modules` and `FinetunedLM` all load it;
  `FinetunedLM` (its `FinetunedEngine`) loads a base once per process and switches between its adapters.
- "merged": the adapter folded into the base weights: a plain model, like a full finetune's.

    merge_adapter("runs/QA-1a2b/models/answer", "answer-merged")   # a full model from an adapter
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bootfinetune.config import TrainConfig
from bootfinetune.training.render import model_kind

ADAPTER_CONFIG = "adapter_config.json"


def lora_config(tc: TrainConfig, kind: str) -> Any:
    """The PEFT `LoraConfig` for the training options and model kind ("causal" or "seq2seq")."""
    from peft import LoraConfig, TaskType

    targets = tc.lora_target_modules
    return LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout, bias="none",
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      task_type=TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM)


def apply_lora(model: Any, tc: TrainConfig, kind: str) -> Any:
    """Wraps `model` in a PEFT model with fresh adapters; the base's weights stop training."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(tc, kind))


def is_adapter(model_dir: str | Path) -> bool:
    """Whether a directory holds a PEFT adapter (rather than a full model)."""
    return (Path(model_dir) / ADAPTER_CONFIG).exists()


def recorded_base(model_dir: str | Path) -> str | None:
    """The `base_model_name_or_path` a PEFT adapter's folder records; None for a full model or an adapter naming none."""
    config = Path(model_dir) / ADAPTER_CONFIG
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.exists() else None


def adapter_base(model_dir: str | Path) -> str:
    """The base model an adapter was trained on (its `base_model_name_or_path`)."""
    base = recorded_base(model_dir)
    if not base:
        raise ValueError(f"{model_dir}/{ADAPTER_CONFIG} names no base_model_name_or_path; set it to the base "
                         "model's directory or hub id.")
    return base


def export_lora(state_dict: dict[str, Any], target: str, kind: str, out: Path, tc: TrainConfig) -> dict[str, Any]:
    """Writes the trained adapter (or the merged model) from a consolidated checkpoint's weights.

    The checkpoint holds the PEFT model's parameters; only the adapters' (`lora_` names) are
    read, since the base is `target` itself, unchanged. Returns facts for the manifest.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    base = auto.from_pretrained(target, dtype=torch.float32, use_safetensors=True,
                                trust_remote_code=tc.trust_remote_code)
    model = apply_lora(base, tc, kind)
    wanted = {n for n, _ in model.named_parameters() if "lora_" in n}
    adapters = {k: v for k, v in state_dict.items() if "lora_" in k}
    if wanted - set(adapters):
        raise ValueError(f"the checkpoint lacks adapter weights {sorted(wanted - set(adapters))[:3]} "
                         f"(of {len(wanted)}); was it trained with these lora_* options?")
    model.load_state_dict(adapters, strict=False)
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    model.peft_config["default"].base_model_name_or_path = str(target)
    if tc.lora_export == "merged":
        merged = model.merge_and_unload()
        if tc.bf16:
            merged = merged.to(torch.bfloat16)
        merged.save_pretrained(out)
    else:
        model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors (fp32: they are small)
    return {"export": tc.lora_export, "base": str(target), "adapter_parameters": adapter_params,
            "r": tc.lora_r, "alpha": tc.lora_alpha, "dropout": tc.lora_dropout,
            "target_modules": tc.lora_target_modules}


def merge_adapter(adapter_dir: str | Path, out: str | Path, base: str | None = None, *,
                  trust_remote_code: bool = False) -> Path:
    """Folds an exported adapter into its base: a full model in `out` (tokenizer and manifest copied).

    Args:
        adapter_dir: An adapter export (`models/{key}/` of a run with lora_export="adapter").
        out: Where the merged model goes (created).
        base: The base model; None reads it from the adapter's config.
        trust_remote_code: Let the base's own code run (as the run's `trust_remote_code`).
    """
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    adapter_dir, out = Path(adapter_dir), Path(out)
    base = base or adapter_base(adapter_dir)
    trust = {"trust_remote_code": trust_remote_code}
    auto = AutoModelForSeq2SeqLM if model_kind(AutoConfig.from_pretrained(base, **trust)) == "seq2seq" \
        else AutoModelForCausalLM
    model = PeftModel.from_pretrained(auto.from_pretrained(base, dtype=torch.float32, use_safetensors=True, **trust),
                                      str(adapter_dir))
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter_dir, **trust).save_pretrained(out)
    if (adapter_dir / "manifest.json").exists():
        shutil.copy(adapter_dir / "manifest.json", out / "manifest.json")
    return out

