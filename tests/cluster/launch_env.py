"""The environment the cluster tests launch ranks with, and the `.deepspeed_env` that carries it to pdsh ranks."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = sys.executable  # the venv's python (not resolved: the venv's bin/ must stay first on PATH)
VENV_BIN = str(Path(sys.executable).parent)

# A rank must not inherit a launcher's identity from whoever runs pytest.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CROSS_RANK", "CROSS_SIZE", "CUDA_VISIBLE_DEVICES")
_LAUNCH_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "PMIX_", "OMPI_")

# What every rank needs on a node; also what goes into .deepspeed_env for pdsh ranks.
DS_ENV_KEYS = ("PATH", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME",
               "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_TRACKING_URI", "PYTHONPATH")


def launch_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        OMP_NUM_THREADS="1",  # two ranks share two cores
        GLOO_SOCKET_IFNAME="lo",  # keep gloo's peer connections on 127.0.0.1
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO),
        HVPMTL_PYTHON=VENV_PYTHON,
    )
    env.update(extra)
    return env


def write_deepspeed_env(directory: Path, env: dict) -> Path:
    """`.deepspeed_env` in the launch directory: KEY=VALUE lines that pdsh ranks export (no blank lines:
    DeepSpeed splits every line on '=')."""
    path = Path(directory) / ".deepspeed_env"
    path.write_text("".join(f"{k}={env[k]}\n" for k in DS_ENV_KEYS if k in env))
    return path
