"""Test-wide environment: CPU DeepSpeed without the shm-op build, private caches, quiet MLflow."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Triton's interpreter must be on before anything imports triton.language: its standard-library helpers
# (tl.max, tl.sum, ...) are @triton.jit functions fixed at import. With it on, CPU tensors go through the
# real kernels (hvpmtl.kernels.use_triton), so the engine tests exercise the Triton code too.
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
