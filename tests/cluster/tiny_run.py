"""The one tiny training every cluster test runs (configs/test_tiny.yaml, 2 ranks), and how to read its results.

Every launch path (deepspeed local, deepspeed --hostfile/pdsh, srun, deepspeed --launcher slurm,
preempted + requeued, killed + resumed) trains the same 2-rank run, so each must log the same
losses at every step as one uninterrupted local run: the reference.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .launch_env import REPO, VENV_BIN, launch_env
from .procs import free_port

CONFIG = REPO / "configs" / "test_tiny.yaml"
ENTRY = REPO / "launchers" / "pretrain.py"
STEPS = 8
CHECKPOINT_EVERY = 2
LOSS_KEYS = ("loss", "asl", "swav", "mim", "distill")


def overrides(output_dir: Path, *, tracking: bool = False, steps: int = STEPS, **more) -> list[str]:
    """`--set` arguments; absolute paths so the run does not depend on its working directory."""
    values = {
        "run.output_dir": str(output_dir),
        "run.ds_config": str(REPO / "ds_configs" / "zero2.json"),
        "optim.max_steps": steps,
        "optim.micro_batch_size": 2,
        "run.checkpoint_every": CHECKPOINT_EVERY,
        "run.progress_bar": "false",
        "tracking.enabled": "true" if tracking else "false",
        **more,
    }
    args = []
    for k, v in values.items():
        args += ["--set", f"{k}={v}"]
    return args


def pretrain_args(output_dir: Path, **kw) -> list[str]:
    return ["--config", str(CONFIG), *overrides(output_dir, **kw)]


def deepspeed_local_cmd(*args: str, ranks: int = 2) -> list[str]:
    """`deepspeed --num_gpus N launchers/pretrain.py` on this machine (the CPU reports one device: ask for N)."""
    return [f"{VENV_BIN}/deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), str(ENTRY), *args]


# Slurm jobs on the test node (2 CPUs, no GPUs): 2 tasks of 1 CPU; --gres=gpu:0 replaces the scripts'
# `#SBATCH --gres=gpu:8` (the ranks then run on the CPU with gloo).
ONE_NODE_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=gpu:0"]


def slurm_job_env(slurm_conf: Path, output_dir: Path, **kw) -> dict:
    """Settings for launchers/slurm/*.sbatch as environment variables (CONFIG, EXTRA_ARGS); the documented way
    is arguments after the script name: `pretrain_args(output_dir)`."""
    return launch_env(SLURM_CONF=str(slurm_conf), CONFIG=str(CONFIG), EXTRA_ARGS=" ".join(overrides(output_dir, **kw)))


def read_metrics(output_dir: Path, skip_lines: int = 0) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()[skip_lines:]
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def metrics_lines(output_dir: Path) -> int:
    path = Path(output_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def last_step(output_dir: Path) -> int:
    rows = read_metrics(output_dir)
    return max((r["step"] for r in rows), default=0)


def by_step(rows: list[dict]) -> dict[int, dict]:
    """The last row logged for each step (a resumed run logs the steps after its checkpoint again)."""
    return {r["step"]: r for r in rows}


def assert_same_losses(rows: list[dict], reference: dict[int, dict], steps, what: str, tol: float = 1e-6):
    got = by_step(rows)
    missing = [s for s in steps if s not in got]
    assert not missing, f"{what}: no metrics for steps {missing} (logged: {sorted(got)})"
    bad = []
    for s in steps:
        for k in LOSS_KEYS:
            a, b = got[s][k], reference[s][k]
            if not math.isclose(a, b, rel_tol=tol, abs_tol=tol):
                bad.append(f"step {s} {k}: {a!r} vs uninterrupted {b!r}")
    assert not bad, f"{what}: losses differ from the uninterrupted reference run:\n" + "\n".join(bad)


def checkpoint_tags(output_dir: Path) -> list[str]:
    ckpt = Path(output_dir) / "checkpoints"
    return sorted(p.name for p in ckpt.glob("step_*") if (p / "COMPLETE").is_file())


def latest_tag(output_dir: Path) -> str:
    path = Path(output_dir) / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else ""
