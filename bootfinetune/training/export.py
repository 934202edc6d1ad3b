"""A checkpoint of the training loop as a Hugging Face folder: the full weights of any engine (the plain one,
DeepSpeed ZeRO-0 to 3) consolidated and written over the base model's config and generation config with
`save_pretrained`; a LoRA run writes its adapter or the merged model instead (`lora.export_lora`).

Where the export runs and where its folder goes is the finetune stage's concern (`stages/export.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

from bootfinetune.config import TrainConfig
from bootfinetune.errors import FinetuneError
from bootfinetune.training.answer_tokens import fit_embeddings
from bootfinetune.training.checkpoints import DS_DIR
from bootfinetune.training.lora import export_lora

log = logging.getLogger(__name__)


def export_checkpoint(ckpt_dir: Path, epoch: int, target: str, kind: str, out: Path,
                      config: TrainConfig, *, tokenizer: Any = None, base_vocab: int | None = None) -> dict[str, Any] | None:
    """Consolidates a DeepSpeed checkpoint (any ZeRO stage) into a Hugging Face directory.

    The base model is loaded from `target` (for its config and generation config), the
    checkpoint's full fp32 weights replace its own, and `save_pretrained` writes safetensors
    (tied weights are stored once). bf16 training exports bf16 weights, else fp32.
    A LoRA run exports its adapter or the merged model instead (see `lora.export_lora`) and
    returns the adapter's facts for the manifest; a full finetune returns None.
    With `tokenizer` longer than `base_vocab` (tokens added for training), the base's
    embeddings are fitted to it first, as the training loop did.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    state_dict = consolidated_state_dict(ckpt_dir / DS_DIR, f"epoch_{epoch}", config.zero_stage)
    if config.lora:
        try:
            return export_lora(state_dict, target, kind, out, config)
        except ValueError as exc:
            raise FinetuneError(f"checkpoint {ckpt_dir}: {exc}") from exc
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(target, dtype=torch.float32, use_safetensors=True,
                                 trust_remote_code=config.trust_remote_code)
    if tokenizer is not None and base_vocab is not None and len(tokenizer) > base_vocab:
        fit_embeddings(model, tokenizer, base_vocab)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = _tied_names(model)
    if unexpected or set(missing) - tied:
        raise FinetuneError(f"checkpoint {ckpt_dir} does not match {target}: missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}.")
    model.tie_weights()
    if config.bf16:
        model = model.to(torch.bfloat16)
    gen = model.generation_config
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else gen.eos_token_id
    model.save_pretrained(out)
    return None


def trained_config(config: TrainConfig, state: dict[str, Any]) -> TrainConfig:
    """The options with the engine the loop chose (`zero_stage="auto"` resolved), as the checkpoint was written."""
    engine = state.get("engine") or {}
    if not engine:
        return config
    return dataclasses.replace(config, zero_stage=engine["zero_stage"], offload_optimizer=engine["offload_optimizer"],
                               offload_params=engine["offload_params"])


def consolidated_state_dict(ds_dir: Path, tag: str, zero_stage: int) -> dict[str, Any]:
    """Full fp32 weights from a DeepSpeed checkpoint: ZeRO-1/2/3 partitions merged, or stage 0's module.

    Stage 0's file is read with `weights_only=True` (tensors and plain containers, no code). ZeRO-1/2/3
    merge through DeepSpeed's `zero_to_fp32`, which unpickles the partition files itself (`weights_only=False`),
    as DeepSpeed's own resume does: those checkpoints must come from a trusted writer (docs/failures.md, "Trust").
    """
    import torch

    if zero_stage == 0:
        states = torch.load(ds_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It prints a line per step of the merge, and a progress bar (stderr) over the partition files.
    with contextlib.redirect_stdout(io.StringIO()) as said, contextlib.redirect_stderr(said):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    log.debug("zero_to_fp32: %s", said.getvalue().strip())
    return state


def _tied_names(model: Any) -> set[str]:
    """Parameter names that share storage with another one (e.g. lm_head.weight tied to the embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            tied |= {name, seen[ptr]}
        else:
            seen[ptr] = name
    return tied
