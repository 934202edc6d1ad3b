"""The training loop's checkpoints: written per epoch (every rank its DeepSpeed shards, rank 0 the loop
state), reported to Ray Train or kept in a folder, and found again when a run restarts.

A checkpoint directory holds `deepspeed/` (a resumable DeepSpeed checkpoint, tag `epoch_{n}`; the plain
engine writes its stage-0 layout there: `torch_engine`) and `trainer_state.json` (the loop's `LoopState`,
written last: its presence means the checkpoint is whole).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
"""Loop state inside a checkpoint (written by rank 0 after the DeepSpeed files)."""
DS_DIR = "deepspeed"
"""DeepSpeed checkpoint folder inside a checkpoint."""


def save_and_report(ray: bool, checkpoint_dir: str | None, engine: Any, state: dict[str, Any],
                    metrics: dict[str, Any], epoch: int, rank: int) -> float:
    """Writes a resumable checkpoint and reports it (under Ray) or keeps it in `checkpoint_dir`
    (without Ray; nothing is written without one). Returns the seconds it took."""
    t0 = time.time()
    if ray:
        import ray.train

        tmp = Path(tempfile.mkdtemp(prefix=f"bootfinetune-ckpt-{epoch}-"))
        try:
            write_checkpoint(tmp, engine, state, epoch, rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"epoch_{epoch:03d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif checkpoint_dir:
        write_checkpoint(Path(checkpoint_dir) / f"epoch_{epoch:03d}", engine, state, epoch, rank)
    return time.time() - t0


def write_checkpoint(path: Path, engine: Any, state: dict[str, Any], epoch: int, rank: int) -> None:
    import torch.distributed as dist

    engine.save_checkpoint(str(path / DS_DIR), tag=f"epoch_{epoch}")
    if rank == 0:  # written last: its presence means the checkpoint is whole
        from bootfinetune.run.jsonio import write_json

        write_json(path / STATE_FILE, state)
    dist.barrier()


def find_resume(ray: bool, checkpoint_dir: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from (Ray's latest, or the newest whole one in checkpoint_dir) and its
    loop state, or (None, None)."""
    path = None
    if ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            path = Path(ckpt.to_directory()) if ckpt.filesystem.type_name != "local" else Path(ckpt.path)
    elif checkpoint_dir and Path(checkpoint_dir).is_dir():
        done = sorted(p for p in Path(checkpoint_dir).glob("epoch_*") if (p / STATE_FILE).exists())
        path = done[-1] if done else None
    if path is None or not (path / STATE_FILE).exists():
        return None, None
    return path, json.loads((path / STATE_FILE).read_text())
