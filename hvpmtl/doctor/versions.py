"""What a rank runs: the hvpmtl revision (`git describe`) and a hash of its sources, the Python, torch,
DeepSpeed, DALI and CUDA versions, the GPU model. Every rank must have the same."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REVISION_ENV = "HVPMTL_REVISION"  # overrides the detected revision (an install without git metadata; the tests)
PACKAGE_DIR = Path(__file__).resolve().parents[1]
CHECKOUT = PACKAGE_DIR.parent


def revision(root: Path = CHECKOUT) -> str:
    """`git describe` of the checkout hvpmtl is imported from, else the package version (REVISION_ENV wins)."""
    if os.environ.get(REVISION_ENV):
        return os.environ[REVISION_ENV]
    from hvpmtl import __version__

    if (root / ".git").exists():
        try:  # safe.directory: the checkout may belong to another user than the one the ranks run as
            cp = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(root), "describe", "--always",
                                 "--dirty", "--tags"], capture_output=True, text=True, timeout=20)
            if cp.returncode == 0 and cp.stdout.strip():
                return cp.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return f"{__version__} (no git)"


def sources_hash(package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 of every hvpmtl/**/*.py (relative path and bytes): two checkouts that `git describe` calls the same
    (both -dirty, or no git at all) still differ here when their code does."""
    h = hashlib.sha256()
    for p in sorted(package_dir.rglob("*.py")):
        h.update(str(p.relative_to(package_dir)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def versions(local_rank: int) -> dict:
    import deepspeed
    import torch

    try:
        import nvidia.dali as dali
        dali_version = dali.__version__
    except ImportError:
        dali_version = "not installed"
    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "dali": dali_version, "cuda": torch.version.cuda or "none",
            "gpu": torch.cuda.get_device_name(local_rank) if cuda else "no GPU"}
