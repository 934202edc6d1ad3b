"""The engine one start of the training loop trains: model, optimizer, schedule, and DeepSpeed's ZeRO config.

`build_engine` loads the target, fits the embeddings to added tokens, patches the LM head to
answer positions, wraps the model in LoRA adapters and turns on gradient checkpointing as the
options say, then hands it with a torch optimizer and LR schedule to `deepspeed.initialize`, or,
where `engine_choice` picked the plain engine (one worker, nothing to shard), to `TorchEngine`.
`train_loop` calls it once per (re)start; `deepspeed_config`, `make_optimizer` and
`lr_scheduler` map the options to DeepSpeed and torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from typing import Any, Iterator

from bootfinetune.training.answer_head import answer_logits_only
from bootfinetune.config import TrainConfig
from bootfinetune.training.answer_tokens import fit_embeddings
from bootfinetune.training.distributed import deepspeed_comm
from bootfinetune.training.lora import apply_lora
from bootfinetune.training.torch_engine import TorchEngine


def build_engine(target: str, tc: TrainConfig, kind: str, tokenizer: Any, base_vocab: int, added_tokens: list[str],
                 total_steps: int, ds_config: dict[str, Any] | None, device: Any = None) -> tuple[Any, bool | None]:
    """The engine over `target` for these options: DeepSpeed's, or with `ds_config=None` the plain one.

    Args:
        target: Model id or local directory to start from.
        tc: The training options.
        kind: "causal" or "seq2seq".
        tokenizer: The target's tokenizer, with `added_tokens` already added.
        base_vocab: The tokenizer's size before the added tokens.
        added_tokens: Tokens added so every answer survives the tokenizer (see `training.answer_tokens`).
        total_steps: Optimizer steps of the whole run, for the LR schedule.
        ds_config: `deepspeed_config(tc, world_size)`, or None for `TorchEngine` (one worker).
        device: This rank's device (the plain engine moves the model there; DeepSpeed does itself).

    Returns:
        The engine, and whether the LM head runs on answer positions only (None where not tried:
        the option is off or the model is seq2seq).

    Raises:
        ValueError: LoRA with added tokens (LoRA keeps the embeddings frozen).
    """
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
        model = apply_lora(model, tc, kind)
    if tc.gradient_checkpointing is True:  # "auto" is decided before (engine_choice.choose_checkpointing)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if ds_config is None and device is not None:
        model.to(device)  # before the optimizer: its fused kernel is chosen for where the parameters are
    if tc.compile_layers:
        compile_layers(model, tc)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], tc)
    scheduler = lr_scheduler(optimizer, tc, total_steps)
    if ds_config is None:
        return TorchEngine(model, optimizer, scheduler, accumsteps=tc.accumsteps, max_grad_norm=tc.max_grad_norm,
                           bf16=tc.bf16, device=device), head_only
    import deepspeed

    deepspeed_comm(tc.use_gpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine, head_only


@contextlib.contextmanager
def zero3_loading(ds_config: dict[str, Any] | None, tc: TrainConfig) -> Iterator[None]:
    """Under ZeRO-3, `from_pretrained` loads straight into shards (zero.Init) while this is open, so no rank
    holds the whole model; transformers needs `accelerate` for that, else each rank loads it whole and
    DeepSpeed shards it. Elsewhere it does nothing."""
    if ds_config is None or tc.zero_stage != 3 or not importlib.util.find_spec("accelerate"):
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    deepspeed_comm(tc.use_gpu)  # first: the config reads the world size from DeepSpeed's backend
    config = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del config  # transformers holds it by a weak reference: alive until here
        unset_hf_deepspeed_config()


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
    AdamW makes full-size temporaries there, while DeepSpeedCPUAdam updates in place with SIMD on
    every core. It is a C++ op that DeepSpeed builds with ninja on first use (cached in
    ~/.cache/torch_extensions).
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
    """Warmup over `warmup_ratio` of the optimizer steps (linear from 0), then linear decay to 0, half a cosine
    down to 0, or constant: the Hugging Face schedules of those names (`get_scheduler`, the same factors at every
    step: `unit/test_train_loop.py`). Written here because `transformers.get_scheduler` lives with the Trainer,
    whose import pulls in PEFT when it is installed: seconds in every worker, for three formulas."""
    from torch.optim.lr_scheduler import LambdaLR

    warmup, schedule = math.ceil(tc.warmup_ratio * total_steps), tc.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, factor)
