"""Process-group set-up for every launcher: `deepspeed` (RANK/LOCAL_RANK/WORLD_SIZE), torchrun, and
Slurm's srun (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, which `deepspeed --launcher slurm` relies on too)."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def map_slurm_env() -> None:
    """Under srun the ranks only see SLURM_*: derive what torch.distributed expects."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def init_distributed(timeout_s: int = 600) -> tuple[int, int, int]:
    """Initialise (or join) the default process group; returns (rank, local_rank, world_size).

    NCCL on GPUs, gloo on the CPU; a single process with no launcher becomes a world of one.
    """
    import deepspeed

    map_slurm_env()
    env = os.environ
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(_free_port())
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                   verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(env["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, local_rank, world


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_mean(values: dict[str, float], device) -> dict[str, float]:
    """Mean over ranks of a dict of floats, one collective."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device) -> bool:
    """True on every rank when the flag is set on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
