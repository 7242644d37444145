"""Process-group set-up for every launcher: `deepspeed` (RANK/LOCAL_RANK/WORLD_SIZE), torchrun, and
Slurm's srun (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, which `deepspeed --launcher slurm` relies on too)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from hvpmtl.slurm_env import map_slurm_env  # srun's SLURM_* -> RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*


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
        # groups DeepSpeed built on an earlier process group of this process (its world clone, ZeRO's
        # data-parallel group) died with it, whoever tore it down: forget them before a new one
        from deepspeed.utils import groups
        groups._release_process_group_references(group=None)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                   verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(env["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, local_rank, world


def destroy_process_group() -> None:
    """Tear the default process group down through DeepSpeed, which then forgets the groups it built on it (its
    world clone, ZeRO's data-parallel group): torch's own teardown would leave those behind, and a process that
    trains again (a second in-process run) would find them unregistered."""
    if not dist.is_initialized():
        return
    import deepspeed.comm as ds_comm

    if getattr(ds_comm, "cdb", None) is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def apply_collective_timeout(timeout_s: int) -> int:
    """Gives every process group this rank belongs to the run's collective timeout; returns how many.

    DeepSpeed builds its own groups (ZeRO's data-parallel clone of the world) with `new_group(ranks)`, which
    gets torch's 30-minute default, not init_process_group's timeout: a rank that hangs (SIGSTOP, a stuck
    file system) then held the others in ZeRO's gradient reduction for 30 minutes. Call after the engine
    is built, when those groups exist."""
    if not dist.is_initialized():
        return 0
    timeout = datetime.timedelta(seconds=timeout_s)
    groups = [g for g in dist.distributed_c10d._world.pg_map if g is not None and dist.get_rank(g) >= 0]
    for g in groups:
        dist.set_timeout(timeout, g)
    return len(groups)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sum_to_host(t: torch.Tensor) -> list[float]:
    """SUM over ranks of a small 1-D tensor (one collective, none outside torch.distributed), then one read on
    the host. What a training step reduces goes through here, packed into a single tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


@dataclass
class StepResult:
    """One micro-batch of any trainer. Values are on the host, reduced over ranks."""

    losses: dict[str, float]  # each loss term and 'loss', mean over ranks
    nonfinite: tuple[str, ...] = ()  # terms not finite on some rank: then no rank stepped
    preempt: bool = False  # some rank was asked to stop (SIGUSR1/SIGTERM)
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # diagnostic sums, summed over ranks (host)
    boundary: bool = True  # this micro-batch ended an optimizer step


def reduce_step(losses: dict[str, torch.Tensor], sums: dict[str, torch.Tensor], preempt: bool,
                world_size: int) -> StepResult:
    """The one collective and the one host read of a training micro-batch: SUM over ranks of [losses, their
    non-finite flags, the preemption flag, the diagnostic sums] (float64). Nothing else in a step reads the
    device: the step cannot decide to back-propagate without it."""
    names, sum_keys = list(losses), sorted(sums)
    values = torch.stack([losses[k].detach().double().reshape(()) for k in names])
    parts = [values, (~torch.isfinite(values)).double(), values.new_tensor([1.0 if preempt else 0.0])]
    parts += [sums[k].double().reshape(-1) for k in sum_keys]
    host = sum_to_host(torch.cat(parts))
    n = len(names)
    nonfinite = tuple(k for k, bad in zip(names, host[n:2 * n]) if bad > 0)
    out_sums, i = {}, 2 * n + 1
    for k in sum_keys:
        size = sums[k].numel()
        out_sums[k] = np.asarray(host[i:i + size], dtype=np.float64).reshape(sums[k].shape)
        i += size
    return StepResult(losses={k: v / world_size for k, v in zip(names, host[:n])}, nonfinite=nonfinite,
                      preempt=host[2 * n] > 0, sums=out_sums)


def average_buffers(module: torch.nn.Module, world_size: int) -> int:
    """Each floating-point buffer (BatchNorm's running statistics) set to its mean over ranks, as mmengine's
    SyncBuffersHook does before evaluation: gradients are reduced, buffers are not, so without it every rank
    would evaluate (and save) its own statistics. Returns how many buffers were averaged."""
    if not distributed(world_size):
        return 0
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    for b in bufs:
        dist.all_reduce(b)
        b.div_(world_size)
    return len(bufs)


def distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------- object collectives
# Small Python objects (verdicts, file entries, decisions) of the checkpoint code: a world of one, or no
# process group at all (tools, tests), needs no collective.


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if distributed(rank_world()[1]):
        dist.barrier()


def broadcast_object(obj):
    """rank 0's object on every rank."""
    if not distributed(rank_world()[1]):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's object, on every rank, in rank order."""
    _, world = rank_world()
    if not distributed(world):
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn, *args, errors: tuple = (), raise_as=RuntimeError):
    """fn(*args) run on rank 0 only; its result reaches every rank. An exception of `errors` raised by fn is
    raised on every rank as raise_as(its message), so all ranks stop together."""
    rank, _ = rank_world()
    result = None
    if rank == 0:
        try:
            result = ("ok", fn(*args))
        except errors as e:
            result = ("error", str(e))
    result = broadcast_object(result)
    if result[0] == "error":
        raise raise_as(result[1])
    return result[1]


def all_gather_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's [n_r, ...] tensor (n_r may differ) in rank order, on every rank."""
    if not distributed(world_size):
        return x
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad = x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))
    parts = [x.new_zeros((max(sizes), *x.shape[1:])) for _ in range(world_size)]
    dist.all_gather(parts, torch.cat([x, pad]))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class Heartbeat:
    """Names the rank that died or hung when a collective fails.

    Each rank stamps "time step" into the rendezvous store from a daemon thread every `interval`
    seconds. After a failed collective, `lost_ranks()` reads the stamps twice, a few intervals apart:
    a rank whose stamp did not move is dead or stopped. If the store itself (hosted by rank 0) is gone,
    rank 0 is the one lost.
    """

    def __init__(self, rank: int, world_size: int, interval: float = 1.0):
        import threading

        self.rank, self.world, self.interval = rank, world_size, interval
        self.step = 0
        self.store_error: str | None = None
        self._stop = threading.Event()
        self.store = None
        if world_size > 1:
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except (AttributeError, RuntimeError, ValueError):
                self.store = None
        if self.store is not None:
            self._beat()
            self._thread = threading.Thread(target=self._loop, name="hvpmtl-heartbeat", daemon=True)
            self._thread.start()

    @staticmethod
    def _key(rank: int) -> str:
        return f"hvpmtl/heartbeat/{rank}"

    def _beat(self) -> None:
        import time

        try:
            self.store.set(self._key(self.rank), f"{time.time():.3f} {self.step}")
        except Exception as e:  # noqa: BLE001 — the store's host (rank 0) is gone
            self.store_error = f"{type(e).__name__}: {e}"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def _read(self) -> dict[int, str | None]:
        out = {}
        for r in range(self.world):
            try:
                out[r] = self.store.get(self._key(r)).decode() if self.store.check([self._key(r)]) else None
            except Exception as e:  # noqa: BLE001
                self.store_error = f"{type(e).__name__}: {e}"
                return {}
        return out

    def lost_ranks(self) -> str:
        """A sentence naming the ranks that stopped responding, or '' when every rank is alive."""
        import time

        if self.store is None:
            return ""
        first = self._read()
        time.sleep(3 * self.interval)
        second = self._read() if first else {}
        if self.store_error and not second:
            return (f"rank 0 is lost: the rendezvous store it hosts is unreachable "
                    f"({os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}; {self.store_error})")
        now = time.time()
        lost = []
        for r in range(self.world):
            if r == self.rank:
                continue
            if second.get(r) is None or second[r] == first.get(r):
                stamp = (second.get(r) or "").split()
                age = f"last heartbeat {now - float(stamp[0]):.0f} s ago at step {stamp[1]}" if stamp else "no heartbeat"
                lost.append(f"rank {r} ({age})")
        return "lost " + ", ".join(lost) if lost else ""

    def close(self) -> None:
        self._stop.set()
