"""Where a process runs and how the ranks of a training run talk: node ids, the process group, collectives.

Shared by the training loop (under Ray Train, torchrun or one plain process) and the bootstrap
actors (which record the node they ran on).
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Iterator


def node_id() -> str | None:
    """The Ray node this process runs on, or None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def rank_nodes(world: int) -> list[str]:
    """Each rank's Ray node id (its host name outside Ray), gathered on every rank."""
    import torch.distributed as dist

    node = node_id() or socket.gethostname()
    if world <= 1 or not dist.is_initialized():
        return [node]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, node)
    return [str(n) for n in out]


def all_reduce(values: list[float], device: Any, op: str) -> list[float]:
    """`values` reduced over the ranks ("sum", "min" or "max"), as floats."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def set_threads() -> None:
    """Torch's intra-op threads follow OMP_NUM_THREADS when set (Ray sets it to the worker's CPUs):
    two workers on two cores must not each start a thread per core."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


@contextlib.contextmanager
def process_group(*, ray: bool, use_gpu: bool) -> Iterator[tuple[int, int, Any]]:
    """(rank, world size, device) in a torch process group. Ray Train and torchrun make the group (Ray
    Train before the loop runs; under torchrun it is made here from the env vars); a plain process gets a
    world of 1, its env vars set only while the loop runs. That group is kept for the process's life:
    DeepSpeed caches it, so a destroyed one breaks the next run. DeepSpeed itself is not imported here:
    the plain engine (one worker) never needs it (`deepspeed_comm` when the engine is DeepSpeed's)."""
    import torch.distributed as dist

    backend = "nccl" if use_gpu else "gloo"
    alone = not ray and "RANK" not in os.environ
    saved = dict(os.environ)
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://")
        yield dist.get_rank(), dist.get_world_size(), device(ray=ray, use_gpu=use_gpu)
    finally:
        if alone:
            os.environ.clear()
            os.environ.update(saved)


def deepspeed_comm(use_gpu: bool) -> None:
    """DeepSpeed's communication backend over the process group `process_group` made (a no-op once made),
    without its shared-memory op (`no_shm_comm_op`); `deepspeed.initialize` would otherwise make it itself."""
    import deepspeed

    with no_shm_comm_op():
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False,
                                   verbose=False)


@contextlib.contextmanager
def no_shm_comm_op() -> Iterator[None]:
    """DeepSpeed's communication backend without its CPU shared-memory op.

    On a CPU-only torch, `deepspeed.init_distributed` JIT-builds `deepspeed_shm_comm` (C++ with
    ninja: a minute or more in every fresh virtual environment, after probing every op's compiler)
    the first time a process makes the backend. Only `inference_all_reduce` uses it, which is
    tensor-parallel inference (AutoTP); training reduces through torch.distributed (gloo), so the
    training loop never needs it, with one worker or many. DeepSpeed has no switch for it, so its
    builder is replaced while the backend is made (the backend then records no op, as on a
    platform without one).
    """
    import sys

    import deepspeed.comm.torch  # noqa: F401 (the module, not the `torch` name deepspeed.comm re-exports)

    module = sys.modules["deepspeed.comm.torch"]
    original = getattr(module, "build_shm_op", None)
    if original is None:  # a DeepSpeed without it: nothing to skip
        yield
        return
    module.build_shm_op = lambda: None
    try:
        yield
    finally:
        module.build_shm_op = original


def device(*, ray: bool, use_gpu: bool) -> Any:
    """This rank's torch device (and, on GPU, the current CUDA device set to it)."""
    import torch

    if use_gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if ray:
            import ray.train.torch

            dev = ray.train.torch.get_device()
        else:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
