"""Which engine a run gets: the plain one or DeepSpeed's ZeRO stage and offload, from the model's size and the memory at hand.

`zero_stage="auto"` (the default) picks the least sharding whose model states (weights, gradients
and AdamW's state) fit each worker: with one worker the plain torch engine (`torch_engine`: nothing
to shard with no peer, so no DeepSpeed; recorded as stage 0, whose checkpoint layout it shares), with several ZeRO-1 (the
optimizer state sharded, the weights and gradients whole: the same traffic as DDP); ZeRO-2, ZeRO-3, then CPU offload only when the estimate says a
smaller step does not fit. An explicit stage (and explicit offload flags) always win.

The estimate counts bytes per parameter, as DeepSpeed's own `estimate_zero*_model_states_mem_needs`
do: weights (2 in bf16, 4 in fp32), gradients of the trainable ones (same width), AdamW's two fp32
moments (8) and, in bf16, the fp32 master copy (4), each divided by the workers where the stage
shards it. The states must fit in `HEADROOM` of the memory, the rest is left to activations. The
memory is the GPU's on a GPU run, and on CPU the host's available memory shared by the workers on
that node; the smallest over the ranks counts.

`gradient_checkpointing="auto"` (the default) then weighs a micro batch's activations (`activation_bytes`:
the longest micro batch of the data, its per-layer tensors and the head's logits) against what the states
leave: checkpointing (recomputing each layer in the backward pass, about a third more compute) is turned
on only when they would not fit without it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from bootfinetune.config import TrainConfig
from bootfinetune.training.distributed import all_reduce
from bootfinetune.training.lora import apply_lora

HEADROOM = 0.5
"""Share of a worker's memory the model states may take; the rest is for activations and buffers."""
GiB = 1 << 30


@dataclass(frozen=True)
class EngineChoice:
    """The engine one run trains with, and why (recorded in the manifest as `engine`)."""

    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    reason: str
    estimate_bytes: int | None = None
    """Model states per worker under this choice (None when the stage was given and not estimated)."""
    memory_bytes: int | None = None
    """The memory per worker the estimate was held against."""
    gradient_checkpointing: bool = False
    checkpointing_reason: str = ""
    activation_bytes: int | None = None
    """A micro batch's activations without checkpointing (None when checkpointing was given, not estimated)."""
    engine: str = "deepspeed"
    """"deepspeed", or "torch" for the plain engine (`torch_engine.TorchEngine`: one worker, ZeRO-0 by auto)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """E.g. "ZeRO-0 (auto: model states 0.01 GiB ...)"."""
        off = [n for n, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        if self.engine == "torch":
            text = f"plain torch, no DeepSpeed ({self.reason})"
        else:
            text = f"ZeRO-{self.zero_stage}{' + offload ' + '/'.join(off) if off else ''} ({self.reason})"
        ckpt = f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"
        return f"{text}; {ckpt}{f' ({self.checkpointing_reason})' if self.checkpointing_reason else ''}"


def model_state_bytes(params: int, trainable: int, *, bf16: bool, world: int, stage: int,
                      offload_optimizer: bool = False, offload_params: bool = False) -> int:
    """Bytes of weights, gradients and AdamW state one worker holds in device memory.

    Example:
        >>> model_state_bytes(1000, 1000, bf16=False, world=1, stage=0)  # 4 weights + 4 grads + 8 moments
        16000
        >>> model_state_bytes(1000, 1000, bf16=True, world=4, stage=1)   # 2 + 2 + (4 master + 8) / 4
        7000
    """
    width = 2 if bf16 else 4
    weights, grads = width * params, width * trainable
    optim = (8 + (4 if bf16 else 0)) * trainable
    if offload_optimizer:
        optim = 0
    if stage >= 1:
        optim //= world
    if stage >= 2:
        grads //= world
    if stage >= 3:
        weights = 0 if offload_params else weights // world
    return weights + grads + optim


def _ladder(world: int) -> list[tuple[int, bool, bool]]:
    """(stage, offload_optimizer, offload_params) from the least sharding to the most.
    With one worker ZeRO shards nothing: only offload saves memory there."""
    if world == 1:
        return [(0, False, False), (2, True, False), (3, True, True)]
    return [(1, False, False), (2, False, False), (3, False, False), (3, True, False), (3, True, True)]


def _with_given(option: tuple[int, bool, bool], tc: TrainConfig) -> tuple[int, bool, bool]:
    """A ladder step with the offload the options ask for, at a stage that allows it."""
    stage, optimizer, params = option
    optimizer, params = optimizer or tc.offload_optimizer, params or tc.offload_params
    return (3 if params else max(stage, 1) if optimizer else stage), optimizer, params


def choose_engine(tc: TrainConfig, params: int, trainable: int, world: int, memory_bytes: int) -> EngineChoice:
    """The engine for a model of `params` weights (`trainable` of them in the optimizer) on `world` workers
    with `memory_bytes` each. A given `zero_stage` wins; given offload flags are kept."""
    if tc.zero_stage != "auto":
        return EngineChoice(int(tc.zero_stage), tc.offload_optimizer, tc.offload_params,
                            f"zero_stage={tc.zero_stage} given")
    budget = int(memory_bytes * HEADROOM)
    options = list(dict.fromkeys(_with_given(o, tc) for o in _ladder(world)))

    def need(o: tuple[int, bool, bool]) -> int:
        return model_state_bytes(params, trainable, bf16=tc.bf16, world=world, stage=o[0],
                                 offload_optimizer=o[1], offload_params=o[2])

    fits = [o for o in options if need(o) <= budget]
    pick = fits[0] if fits else options[-1]
    size = f"{params / 1e6:.1f}M params ({trainable / 1e6:.1f}M trainable, {'bf16' if tc.bf16 else 'fp32'})"
    states = f"model states {_size(need(pick))} per worker"
    room = f"{HEADROOM:.0%} of {_size(memory_bytes)}"
    if not fits:
        reason = f"auto: {size} do not fit even fully offloaded ({states} > {room}); expect out-of-memory"
    elif pick == options[0]:
        reason = f"auto: {size} on {world} worker(s): {states} fit in {room}"
    else:
        less = need(options[options.index(pick) - 1])
        reason = (f"auto: {size} on {world} worker(s): {_size(less)} with less sharding would not fit "
                  f"in {room}; {states}")
    plain = world == 1 and pick == (0, False, False)  # DeepSpeed would shard and reduce nothing: torch alone
    return EngineChoice(pick[0], pick[1], pick[2], reason, need(pick), int(memory_bytes),
                        engine="torch" if plain else "deepspeed")


def activation_bytes(dims: dict[str, int], micro_tokens: int, head_tokens: int, *, bf16: bool,
                     checkpointing: bool) -> int:
    """Bytes a micro batch's forward pass keeps for the backward pass, on one worker.

    Per layer and token (attention through SDPA, so no score matrix is kept): about 10 x hidden values for the
    attention block (norm, q/k/v, attention output, projection) and 4 x intermediate for the MLP (gate, up,
    activation, product), at 2 bytes (bf16) or 4; with checkpointing a layer keeps only its input (hidden values)
    and one layer at a time is recomputed whole. The head's float32 logits, twice (softmax and its gradient),
    over the `head_tokens` positions that get logits (the answers with the answer-only head).

    Example:
        >>> d = {"hidden": 1024, "intermediate": 4096, "layers": 24, "vocab": 32000}
        >>> round(activation_bytes(d, 8 * 1024, 8 * 64, bf16=True, checkpointing=False) / 2**30, 2)
        9.87
        >>> round(activation_bytes(d, 8 * 1024, 8 * 64, bf16=True, checkpointing=True) / 2**30, 2)
        0.9
    """
    width = 2 if bf16 else 4
    layer = micro_tokens * (10 * dims["hidden"] + 4 * dims["intermediate"]) * width
    kept = dims["layers"] * micro_tokens * dims["hidden"] * width + layer if checkpointing else dims["layers"] * layer
    return kept + 2 * 4 * head_tokens * dims["vocab"]


def micro_sizes(lengths: list[int], answers: list[int], bsize: int, answers_only: bool) -> tuple[int, int]:
    """(tokens, positions that get logits) of the largest micro batch one rank can form: `bsize` of its longest
    records padded to the longest (a packed micro batch is never larger); the logits cover the answers with
    the answer-only head (or a seq2seq decoder), else every position.

    Example:
        >>> micro_sizes([100, 300, 200], [5, 20, 10], bsize=2, answers_only=True)
        (600, 40)
        >>> micro_sizes([100, 300, 200], [5, 20, 10], bsize=2, answers_only=False)
        (600, 600)
    """
    n = min(bsize, len(lengths))
    longest = max(lengths, default=0)
    return n * longest, n * (max(answers, default=0) if answers_only else longest)


def choose_checkpointing(tc: TrainConfig, choice: EngineChoice, dims: dict[str, int] | None, micro_tokens: int,
                         head_tokens: int) -> EngineChoice:
    """`choice` with gradient checkpointing decided: as given, or ("auto") on only when a micro batch's
    activations do not fit in the memory the model states leave."""
    from dataclasses import replace

    if tc.gradient_checkpointing != "auto":
        return replace(choice, gradient_checkpointing=bool(tc.gradient_checkpointing),
                       checkpointing_reason=f"gradient_checkpointing={tc.gradient_checkpointing} given")
    if dims is None or not choice.memory_bytes:
        return replace(choice, gradient_checkpointing=False,
                       checkpointing_reason="auto: no memory estimate (model shape unknown): off")
    plain = activation_bytes(dims, micro_tokens, head_tokens, bf16=tc.bf16, checkpointing=False)
    room = int(choice.memory_bytes * 0.9) - (choice.estimate_bytes or 0)
    where = f"{micro_tokens} tokens a micro batch: activations {_size(plain)}"
    if plain <= room:
        return replace(choice, gradient_checkpointing=False, activation_bytes=plain,
                       checkpointing_reason=f"auto: {where} fit in the {_size(max(room, 0))} the states leave")
    saved = activation_bytes(dims, micro_tokens, head_tokens, bf16=tc.bf16, checkpointing=True)
    tail = "" if saved <= room else "; even so they do not fit: expect out-of-memory, lower bsize or max_length"
    return replace(choice, gradient_checkpointing=True, activation_bytes=plain,
                   checkpointing_reason=f"auto: {where} > the {_size(max(room, 0))} the states leave; "
                                        f"{_size(saved)} with checkpointing{tail}")


def model_dims(target: str, tc: TrainConfig) -> dict[str, int] | None:
    """hidden, intermediate, layers and vocab of the target's config (None where it names them otherwise)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(target, trust_remote_code=tc.trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    names = {"hidden": ("hidden_size", "d_model", "n_embd"), "intermediate": ("intermediate_size", "d_ff", "n_inner"),
             "layers": ("num_hidden_layers", "num_layers", "n_layer"), "vocab": ("vocab_size",)}
    dims = {}
    for key, options in names.items():
        value = next((getattr(text, n) for n in options if isinstance(getattr(text, n, None), int)), None)
        if value is None and key == "intermediate" and "hidden" in dims:
            value = 4 * dims["hidden"]  # GPT-2's n_inner=None means 4 x hidden
        if value is None:
            return None
        dims[key] = value
    if getattr(text, "num_decoder_layers", None):  # seq2seq: encoder and decoder layers both keep activations
        dims["layers"] += int(text.num_decoder_layers)
    return dims


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


def count_parameters(target: str, kind: str, tc: TrainConfig) -> tuple[int, int]:
    """(weights, trainable weights) of the target as the loop will train it, counted on the meta device
    (no weights are read or allocated). Tied weights count once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(target, trust_remote_code=tc.trust_remote_code)
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=tc.trust_remote_code)
        if tc.lora:
            model = apply_lora(model, tc, kind)
    params = list(model.parameters())  # unique Parameters: tied ones appear once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def worker_memory(use_gpu: bool, device: Any, workers_on_node: int) -> int:
    """Bytes one worker may use: its GPU's memory, or on CPU the host's available memory shared by
    the node's workers."""
    if use_gpu:
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    return host_available_bytes() // max(1, workers_on_node)


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_engine(target: str, kind: str, tc: TrainConfig, rank: int, world: int, nodes: list[str], device: Any,
                   resumed: dict[str, Any] | None, micro: tuple[int, int] = (0, 0)) -> EngineChoice:
    """The engine for this (re)start, the same on every rank. A resumed run keeps its checkpoint's
    engine (a DeepSpeed checkpoint loads only into the stage that wrote it). `micro`: the tokens of the
    largest micro batch (padded) and of its positions that get logits, the same on every rank."""
    if resumed:
        return EngineChoice(int(resumed["zero_stage"]), bool(resumed["offload_optimizer"]),
                            bool(resumed["offload_params"]), f"{resumed.get('reason', '')}; kept on resume",
                            resumed.get("estimate_bytes"), resumed.get("memory_bytes"),
                            bool(resumed.get("gradient_checkpointing", tc.gradient_checkpointing is True)),
                            f"{resumed.get('checkpointing_reason', '')}; kept on resume",
                            resumed.get("activation_bytes"), resumed.get("engine", "deepspeed"))
    if tc.zero_stage != "auto" and tc.gradient_checkpointing != "auto":
        return choose_checkpointing(tc, choose_engine(tc, 0, 0, world, 0), None, 0, 0)
    params, trainable = count_parameters(target, kind, tc)
    mine = worker_memory(tc.use_gpu, device, nodes.count(nodes[min(rank, len(nodes) - 1)]))
    memory = int(all_reduce([mine], device, "min")[0])
    choice = choose_engine(tc, params, trainable, world, memory)
    if tc.zero_stage != "auto":  # a given stage: its states still count against the memory for activations
        from dataclasses import replace

        o = (choice.zero_stage, choice.offload_optimizer, choice.offload_params)
        choice = replace(choice, memory_bytes=memory, estimate_bytes=model_state_bytes(
            params, trainable, bf16=tc.bf16, world=world, stage=o[0], offload_optimizer=o[1], offload_params=o[2]))
    return choose_checkpointing(tc, choice, model_dims(target, tc), *micro)

