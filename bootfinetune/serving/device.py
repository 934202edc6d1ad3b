"""The device a finetuned model loads on in this process, and whether it fits there.

A run's `device` (and `use_gpu`) describe its Ray workers, never the driver: a compiled program
handed back to a driver on a head without accelerators loads its models on what that machine has.
A CUDA device this process lacks becomes the CPU (a warning says so, once per model); a model whose
weights need more than the CPU's free memory is refused before loading, naming how to serve it on
the cluster instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bootfinetune.errors import ProgramError
from bootfinetune.training.lora import recorded_base

logger = logging.getLogger(__name__)

_WARNED: set[str] = set()
_HALF = ("bfloat16", "float16")


def load_device(requested: str | None, model: str) -> str:
    """`requested` where this process has it: None picks CUDA when present; a CUDA device on a machine
    without CUDA gives the CPU."""
    import torch

    has_cuda = torch.cuda.is_available()
    if requested is None:
        return "cuda" if has_cuda else "cpu"
    if requested.startswith("cuda") and not has_cuda:
        if model not in _WARNED:
            _WARNED.add(model)
            logger.warning("device %r (where the run's workers ran it) is not on this machine: %s loads on the CPU "
                           "here. To answer on the cluster's GPUs: `bootfinetune serve RUN_DIR --num-gpus 1`, then "
                           "bootfinetune.load(run_dir, serve_url=...).", requested, model)
        return "cpu"
    return requested


def weights_bytes(model_dir: str) -> int:
    """Bytes the model's weights take loaded on the CPU (float32), with the base of a LoRA adapter; 0 unknown."""
    path = Path(model_dir)
    if not path.is_dir():
        return 0
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    half = str(config.get("torch_dtype") or config.get("dtype") or "") in _HALF
    total = stored * (2 if half else 1)
    base = recorded_base(path)
    total += weights_bytes(base) if base else 0
    return total


def check_fits(model_dir: str, device: str, available: int | None = None) -> None:
    """Raises ProgramError when the model needs more than the CPU's free memory (`available`, default: now).

    An accelerator's own out-of-memory error names itself; the CPU's (the host swapping or the kernel
    killing the driver) does not, so it is checked first.
    """
    if device != "cpu":
        return
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    need = weights_bytes(model_dir)
    if need > 0.9 * available:
        raise ProgramError(
            f"model: {model_dir} needs about {need / 2**30:.1f} GiB on this machine's CPU, which has "
            f"{available / 2**30:.1f} GiB free: serve it where the GPUs are instead (`bootfinetune serve RUN_DIR "
            f"--num-gpus 1` on the cluster) and rebind the program to it: bootfinetune.load(run_dir, "
            f"serve_url='http://127.0.0.1:8000/v1').")
