"""The training loop's checkpoints: one folder per model, written per epoch, found again on a restart.

A model's checkpoint folder (`LoopConfig.checkpoint_dir`: `checkpoints/{folder}` of the run, a local path or
a cloud URI) holds `epoch_{NNN}/` per kept epoch. Each holds `deepspeed/` (a resumable DeepSpeed checkpoint,
tag `epoch_{n}`; the plain engine writes its stage-0 layout there: `torch_engine`) and `trainer_state.json`
(the loop's `LoopState`, written last: its presence means the checkpoint is whole).

Every rank writes its own DeepSpeed files into the epoch's folder (on a URI: into a local temporary folder,
then uploaded), then rank 0 writes the state. The loop owns its checkpoints rather than handing them to Ray
Train's checkpoint manager, because one Ray Train run trains several models one after another
(`model_queue`): Ray Train's manager keeps its N best over the whole run, where each model needs its own best
epoch and its latest. After each epoch rank 0 keeps the best epoch so far (lowest eval loss) and the latest,
and deletes the others.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bootfinetune.run import storage
from bootfinetune.run.jsonio import write_json

STATE_FILE = "trainer_state.json"
"""Loop state inside a checkpoint (written by rank 0 after the DeepSpeed files)."""
DS_DIR = "deepspeed"
"""DeepSpeed checkpoint folder inside a checkpoint."""


def epoch_name(epoch: int) -> str:
    """The folder of an epoch's checkpoint: `epoch_001` for the first."""
    return f"epoch_{epoch:03d}"


def save_checkpoint(checkpoint_dir: str, engine: Any, state: dict[str, Any], epoch: int, rank: int) -> float:
    """Writes epoch `epoch`'s whole checkpoint under `checkpoint_dir` (every rank calls it) and keeps only the
    best and the latest epochs. Returns the seconds it took."""
    import torch.distributed as dist

    t0 = time.time()
    name = epoch_name(epoch)
    if storage.is_uri(checkpoint_dir):
        tmp = Path(tempfile.mkdtemp(prefix=f"bootfinetune-ckpt-{epoch}-"))
        try:
            engine.save_checkpoint(str(tmp / DS_DIR), tag=f"epoch_{epoch}")
            _upload(tmp, storage.join_uri(checkpoint_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        if rank == 0:  # written last: its presence means the checkpoint is whole
            fs, base = storage.filesystem(storage.join_uri(checkpoint_dir, name, STATE_FILE))
            with fs.open_output_stream(base) as out:
                out.write(json.dumps(state).encode())
    else:
        path = Path(checkpoint_dir) / name
        engine.save_checkpoint(str(path / DS_DIR), tag=f"epoch_{epoch}")
        dist.barrier()
        if rank == 0:
            write_json(path / STATE_FILE, state)
    if rank == 0:
        prune(checkpoint_dir, keep={epoch, best_epoch(state["history"])})
    dist.barrier()
    return time.time() - t0


def best_epoch(history: list[dict[str, Any]]) -> int:
    """The epoch (1-based) with the lowest eval loss; the last one when there is no eval data.

    >>> best_epoch([{"epoch": 1, "eval_loss": 2.0}, {"epoch": 2, "eval_loss": 1.5}, {"epoch": 3, "eval_loss": 1.7}])
    2
    """
    scored = [(h["eval_loss"], h["epoch"]) for h in history if h.get("eval_loss") is not None]
    return min(scored)[1] if scored else history[-1]["epoch"]


def whole_epochs(checkpoint_dir: str | None) -> list[int]:
    """The epochs whose checkpoint under `checkpoint_dir` is whole (its state file written), in order."""
    if not checkpoint_dir:
        return []
    if storage.is_uri(checkpoint_dir):
        import pyarrow.fs as pafs

        fs, base = storage.filesystem(checkpoint_dir)
        if fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        names = {f.path.rstrip("/").rsplit("/", 1)[-1] for f in fs.get_file_info(pafs.FileSelector(base))}
        found = [n for n in names if n.startswith("epoch_") and
                 fs.get_file_info(f"{base}/{n}/{STATE_FILE}").type == pafs.FileType.File]
    else:
        root = Path(checkpoint_dir)
        found = [p.name for p in root.glob("epoch_*") if (p / STATE_FILE).exists()] if root.is_dir() else []
    return sorted(int(n.split("_", 1)[1]) for n in found if n.split("_", 1)[1].isdigit())


def read_state(checkpoint_dir: str, epoch: int) -> dict[str, Any]:
    """The loop state in epoch `epoch`'s checkpoint."""
    if storage.is_uri(checkpoint_dir):
        fs, base = storage.filesystem(storage.join_uri(checkpoint_dir, epoch_name(epoch), STATE_FILE))
        with fs.open_input_stream(base) as f:
            return json.loads(f.read().decode())
    return json.loads((Path(checkpoint_dir) / epoch_name(epoch) / STATE_FILE).read_text())


def latest_state(checkpoint_dir: str | None) -> tuple[int | None, dict[str, Any] | None]:
    """(the newest whole epoch, its loop state), or (None, None) when there is none."""
    epochs = whole_epochs(checkpoint_dir)
    if not epochs:
        return None, None
    return epochs[-1], read_state(str(checkpoint_dir), epochs[-1])


def local_copy(checkpoint_dir: str, epoch: int, into: Path) -> Path:
    """Epoch `epoch`'s checkpoint as a local folder: itself for a local path, else downloaded into `into`."""
    if not storage.is_uri(checkpoint_dir):
        return Path(checkpoint_dir) / epoch_name(epoch)
    import pyarrow.fs as pafs

    fs, base = storage.filesystem(storage.join_uri(checkpoint_dir, epoch_name(epoch)))
    pafs.copy_files(base, str(into), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return into


def prune(checkpoint_dir: str, keep: set[int]) -> None:
    """Deletes the epochs' checkpoints under `checkpoint_dir` other than `keep`."""
    for epoch in set(whole_epochs(checkpoint_dir)) - keep:
        if storage.is_uri(checkpoint_dir):
            fs, base = storage.filesystem(storage.join_uri(checkpoint_dir, epoch_name(epoch)))
            fs.delete_dir(base)
        else:
            shutil.rmtree(Path(checkpoint_dir) / epoch_name(epoch), ignore_errors=True)


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, base = storage.filesystem(uri)
    fs.create_dir(base, recursive=True)
    pafs.copy_files(str(local), base, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def report(metrics: dict[str, Any]) -> None:
    """Reports an epoch's metrics to Ray Train (every rank; the checkpoints are the loop's own)."""
    import ray.train

    ray.train.report(metrics)
