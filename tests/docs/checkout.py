"""A checkout as a user has it after `make setup`: the repository's files and `.venv` inside it (the venv that runs
these tests), in a directory of its own, so that scripts finding things from where they lie can be run as written."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# not resolved: a venv's bin/python is a symlink to the base interpreter
VENV_ROOT = Path(os.environ.get("VIRTUAL_ENV") or Path(sys.executable).parent.parent)
LEFT_OUT = (".venv", ".git", "runs", "demo_data", "mlruns", "mlflow.db")


def make_checkout(where: Path, with_venv: bool = True) -> Path:
    root = Path(where) / "hvpmtl"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in LEFT_OUT:
            (root / entry.name).symlink_to(entry)
    if with_venv:
        (root / ".venv").symlink_to(VENV_ROOT, target_is_directory=True)
    return root


def checkout_env(**extra: str) -> dict:
    """The environment of a fresh shell, with this worktree's package first (the venv may hold another checkout's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "MASTER_", "WORLD_SIZE"))}
    env["PYTHONPATH"] = str(REPO)
    env["TRITON_INTERPRET"] = "0"  # a user's shell: the losses' torch path on the CPU (conftest turns it on here)
    env.update(extra)
    return env
