"""The DeepSpeed engine one start of the training loop trains: model, optimizer, schedule and ZeRO config.

`build_engine` loads the target, fits the embeddings to added tokens, patches the LM head to
answer positions, wraps the model in LoRA adapters and turns on gradient checkpointing as the
options say, then hands it with a torch optimizer and LR schedule to `deepspeed.initialize`.
`train_loop` calls it once per (re)start; `deepspeed_config`, `make_optimizer` and
`lr_scheduler` map the options to DeepSpeed and torch.
"""

from __future__ import annotations

import math
from typing import Any

from bootfinetune.training.answer_head import answer_logits_only
from bootfinetune.config import TrainConfig
from bootfinetune.stages.representable import fit_embeddings


def build_engine(target: str, tc: TrainConfig, kind: str, tokenizer: Any, base_vocab: int, added_tokens: list[str],
                 total_steps: int, ds_config: dict[str, Any]) -> tuple[Any, bool | None]:
    """The DeepSpeed engine over `target` for these options.

    Args:
        target: Model id or local directory to start from.
        tc: The training options.
        kind: "causal" or "seq2seq".
        tokenizer: The target's tokenizer, with `added_tokens` already added.
        base_vocab: The tokenizer's size before the added tokens.
        added_tokens: Tokens added so every answer survives the tokenizer (see `representable`).
        total_steps: Optimizer steps of the whole run, for the LR schedule.
        ds_config: `deepspeed_config(tc, world_size)`.

    Returns:
        The engine, and whether the LM head runs on answer positions only (None where not tried:
        the option is off or the model is seq2seq).

    Raises:
        ValueError: LoRA with added tokens (LoRA keeps the embeddings frozen).
    """
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(target, dtype=torch.float32, use_safetensors=True,
                                 trust_remote_code=tc.trust_remote_code)
    model.config.use_cache = False  # training decodes nothing; a KV cache would also hide packed rows' records
    if added_tokens:
        if tc.lora:
            raise ValueError(f"lora=True with added tokens {added_tokens}: LoRA keeps the embeddings "
                             "frozen, so the new tokens would never train; train without LoRA.")
        fit_embeddings(model, tokenizer, base_vocab)
    head_only = None
    if tc.answer_logits_only and kind == "causal":
        head_only = answer_logits_only(model)
    if tc.lora:  # after the head patch: the PEFT wrapper calls the patched forward
        from bootfinetune.training.lora import apply_lora

        model = apply_lora(model, tc, kind)
    if tc.gradient_checkpointing is True:  # "auto" is decided before (engine_choice.choose_checkpointing)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if tc.compile_layers:
        compile_layers(model, tc)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], tc)
    scheduler = lr_scheduler(optimizer, tc, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine, head_only


def compile_layers(model: Any, tc: TrainConfig) -> int:
    """`torch.compile`s each of the model's repeated blocks in place (the classes its `_no_split_modules` names:
    `LlamaDecoderLayer`, `T5Block`...), with dynamic shapes since batches vary in length; returns how many.
    The embeddings and the head (the answer-only head's gather included) stay eager. Under ZeRO-3 the
    parameters are gathered by hooks around each module, which a compiled block would trace through: skipped."""
    import logging

    log = logging.getLogger(__name__)
    if tc.zero_stage == 3:
        log.warning("compile_layers=True is skipped under ZeRO-3 (its parameter gathering hooks wrap every layer)")
        return 0
    names = set(getattr(model, "_no_split_modules", None) or getattr(getattr(model, "base_model", None),
                                                                      "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile(dynamic=True)
    log.info("compile_layers: %d %s block(s) compiled (the first steps include compiling them)", len(blocks),
             "/".join(sorted(names)) or "no")
    return len(blocks)


def make_optimizer(params: list, tc: TrainConfig) -> Any:
    """AdamW: torch's, or DeepSpeed's CPU Adam when the optimizer state lives in CPU memory.

    With `offload_optimizer` the step runs on the host over the fp32 master weights; torch's
    AdamW makes full-size temporaries there (about 8 extra bytes a parameter) and runs slowly,
    while DeepSpeedCPUAdam updates in place with SIMD on every core. It is a C++ op that
    DeepSpeed builds with ninja on first use (under a minute; cached in ~/.cache/torch_extensions).
    """
    import torch

    kwargs = dict(lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.adam_beta1, tc.adam_beta2))
    if tc.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs, fused=fused_adamw_supported(params))


def fused_adamw_supported(params: list) -> bool:
    """Whether torch's fused AdamW (one kernel for the whole update, instead of several per tensor)
    runs on these parameters: floating point, all on a device torch has the fused kernels for (CUDA;
    CPU since torch 2.4: the list torch gives). DeepSpeed later swaps in its fp32 master partitions on the same device."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: not worth guessing
        return False
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def deepspeed_config(tc: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for the options: batch sizes, precision, ZeRO stage and offload.

    The optimizer and scheduler are torch objects handed to `deepspeed.initialize`, so the
    config has no `optimizer`/`scheduler` block (see `make_optimizer` for which optimizer runs).
    """
    if tc.zero_stage == "auto":
        raise ValueError("zero_stage='auto' is resolved before the DeepSpeed config (see engine_choice.resolve_engine).")
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if tc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if tc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": tc.bsize,
        "gradient_accumulation_steps": tc.accumsteps,
        "train_batch_size": tc.bsize * tc.accumsteps * world_size,
        "gradient_clipping": tc.max_grad_norm,
        "bf16": {"enabled": tc.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_scheduler(optimizer: Any, tc: TrainConfig, total_steps: int) -> Any:
    """Warmup over `warmup_ratio` of the optimizer steps, then linear/cosine decay or constant."""
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[tc.lr_schedule]
    warmup = math.ceil(tc.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
