"""What a benchmark's numbers were measured with, printed first by every benchmark and quoted by each
docs/BENCHMARKS.md section: the code revision, the versions of the packages that set the speed, the machine and
the date. Versions come from the installed distributions' metadata (nothing is imported for them)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "timm", "deepspeed", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "triton", "mlflow", "numpy")


def revision() -> str:
    """`git describe --always --dirty` of the checkout ("unknown" outside git)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or "unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name.replace("nvidia-dali-cuda120", "dali").replace("nvidia-dali-cuda130", "dali")] = \
                metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def machine() -> str:
    gpu = ""
    torch = sys.modules.get("torch")  # only when the benchmark imported it already
    if torch is not None and torch.cuda.is_available():
        gpu = f", {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{platform.machine()} {os.cpu_count()} cores{gpu}"


def provenance() -> dict:
    return {"revision": revision(), "versions": versions(), "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def provenance_line() -> str:
    p = provenance()
    pkgs = ", ".join(f"{k} {v}" for k, v in p["versions"].items())
    return f"# code {p['revision']}; {pkgs}; {p['machine']}; {p['date']}"


if __name__ == "__main__":
    print(provenance_line())
