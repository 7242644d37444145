"""What a rank started by Slurm's srun needs before torch.distributed: RANK/WORLD_SIZE/LOCAL_RANK from the
SLURM_* variables, and a rendezvous address that every node can reach.

srun tells a task only SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; `deepspeed --launcher slurm` relies on the
same. The sbatch scripts export MASTER_ADDR (the first host of the allocation); a custom script may not, and
then the answer is the first host of the step's node list, never 127.0.0.1 on a multi-node job (ranks on the
other nodes would wait out the collective timeout for a store they cannot reach).
"""
from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

from hvpmtl.config import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LaunchError(ConfigError):
    """The launch environment cannot work (exit 2 before any worker waits on a collective)."""


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list as `scontrol show hostnames` expands it, in order.

    `node[01-04,07]` -> node01..node04, node07 (zero padding kept: the width of each range's start);
    `a[1-2]b[3-4]` -> a1b3 a1b4 a2b3 a2b4; commas outside brackets separate host expressions.
    """
    hosts: list[str] = []
    for expr in _split_top_level(hostlist.strip(), hostlist):
        hosts.extend(_expand_expr(expr, hostlist))
    return hosts


def _split_top_level(text: str, whole: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"invalid Slurm host list {whole!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"invalid Slurm host list {whole!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"invalid Slurm host list {whole!r}: '[' not closed")
    parts.append(text[start:])
    if any(not p.strip() for p in parts):
        raise LaunchError(f"invalid Slurm host list {whole!r}: empty host name")
    return [p.strip() for p in parts]


def _expand_expr(expr: str, whole: str) -> list[str]:
    """One host expression, e.g. `rack[1-2]-n[01-02]`: the cartesian product of its bracket ranges."""
    out = [""]
    for token in re.findall(r"\[[^\]]*\]|[^\[]+", expr):
        values = _expand_ranges(token[1:-1], whole) if token.startswith("[") else [token]
        out = [o + v for o in out for v in values]
    return out


def _expand_ranges(ranges: str, whole: str) -> list[str]:
    numbers = []
    for part in ranges.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise LaunchError(f"invalid Slurm host list {whole!r}: bad range '{part}'")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise LaunchError(f"invalid Slurm host list {whole!r}: range '{part}' runs backwards")
        numbers.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return numbers


def _first_int(env: MutableMapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"{name}={value!r} is not a number") from None
    return None


def map_slurm_env(env: MutableMapping[str, str] | None = None) -> None:
    """Under srun the ranks only see SLURM_*: derive what torch.distributed expects (in place).

    Does nothing when a launcher already set RANK (deepspeed, torchrun) or when not under Slurm.
    Raises LaunchError, with what to do, when the rendezvous cannot work.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    _check_one_device_per_task(env)
    # the step's nodes (srun may use part of the allocation); task 0 runs on the first of them
    nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
                         if env.get(v, "").strip()), None)
    hosts = expand_hostlist(env[nodelist_var]) if nodelist_var else []
    nnodes = _first_int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES") or len(hosts) or 1
    master = env.get("MASTER_ADDR", "").strip()
    if nnodes > 1:
        if master in LOOPBACK:
            raise LaunchError(
                f"MASTER_ADDR={master} on a {nnodes}-node Slurm job: ranks on the other nodes cannot reach it. "
                f"Unset it (hvpmtl then uses the first host of the allocation) or export the address of the "
                f"first node, e.g. MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)")
        if not master:
            if not hosts:
                raise LaunchError(
                    f"a {nnodes}-node Slurm job without MASTER_ADDR and without SLURM_STEP_NODELIST/"
                    f"SLURM_JOB_NODELIST: no rendezvous address. Export MASTER_ADDR=<first node> (and "
                    f"MASTER_PORT) in the batch script before srun, as launchers/slurm/pretrain.sbatch does")
            env["MASTER_ADDR"] = hosts[0]
    elif not master:
        env["MASTER_ADDR"] = "127.0.0.1"
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 40000))  # as the sbatch scripts


def _check_one_device_per_task(env: MutableMapping[str, str]) -> None:
    """hvpmtl (and DeepSpeed) select cuda:LOCAL_RANK: each task must see all GPUs of its node.

    `--gpus-per-task=1` (or `--gpu-bind=single:1`) gives each task only its own GPU as device 0, so
    task 3 of a node would ask for cuda:3 and fail deep inside CUDA set-up; say so at once.
    """
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not visible or visible.lower() in ("none", "nodevfiles"):
        return
    n_visible = len([d for d in visible.split(",") if d.strip()])
    local_rank = int(env["LOCAL_RANK"])
    if local_rank >= n_visible:
        per_task = env.get("SLURM_GPUS_PER_TASK")
        cause = f" (the job has --gpus-per-task={per_task})" if per_task else ""
        raise LaunchError(
            f"Slurm task with SLURM_LOCALID={local_rank} sees {n_visible} GPU(s) (CUDA_VISIBLE_DEVICES={visible})"
            f"{cause}: hvpmtl uses cuda:LOCAL_RANK, so every task must see all GPUs of its node. Request GPUs "
            f"per node (--gres=gpu:8 --ntasks-per-node=8, as launchers/slurm/*.sbatch do), not --gpus-per-task "
            f"or --gpu-bind")
