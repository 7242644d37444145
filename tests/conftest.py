"""Test-wide environment (CPU DeepSpeed without the shm-op build, private caches, quiet MLflow) and the
session fixtures shared by tests/eval and tests/train: a tiny synthetic data set, one real 2-step
pre-training run (DeepSpeed, MLflow, online eval and image panels on), and a tiny ImageFolder of
coloured shapes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from subprocs import run_cmd  # noqa: F401  (tests/ is on sys.path through this conftest)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_CLASSES = 24  # the synthetic dictionary's

# Triton's interpreter must be on before anything imports triton.language: its standard-library helpers
# (tl.max, tl.sum, ...) are @triton.jit functions fixed at import. With it on, CPU tensors go through the
# real kernels (hvpmtl.kernels.use_triton), so the engine tests exercise the Triton code too.
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "2")


RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _rendezvous_variables_do_not_outlive_a_test():
    """An in-process run sets RANK, MASTER_PORT... (DeepSpeed's init_distributed writes them into
    os.environ); a process a later test starts would inherit them and wait on a rendezvous long gone."""
    before = {k: os.environ.get(k) for k in RENDEZVOUS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


LAUNCHING_FIXTURES = {"pretrain_run", "launch", "s3"}  # fixtures that start processes (s3: a moto_server)


def pytest_collection_modifyitems(config, items):
    """`make test-fast` deselects `slow`: every test that starts processes carries it, explicitly
    (mp.spawn, subprocess) or through a launching fixture."""
    for item in items:
        if LAUNCHING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def syn(tmp_path_factory):
    from hvpmtl.data.tools.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("syn"), 8, seed=1, holdout=24)


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory, syn):
    """configs/test_tiny.yaml for 2 steps through launchers/pretrain.py, every objective on,
    run.eval_every=2 (held-out split of `syn`) and run.image_log_every=2."""
    d = tmp_path_factory.mktemp("pretrain")
    out = d / "run"
    db = f"sqlite:///{d}/mlflow.db"
    code, log = run_cmd([sys.executable, str(ROOT / "launchers/pretrain.py"), "--config", str(ROOT / "configs/test_tiny.yaml"),
                     "--set", f"run.output_dir={out}", "--set", f"run.ds_config={ROOT / 'ds_configs/zero2.json'}",
                     "--set", "optim.max_steps=2", "--set", "run.eval_every=2", "--set", "run.image_log_every=2",
                     "--set", f"data.num_classes={NUM_CLASSES}", "--set", f"data.root={syn['root']}",
                     "--set", f"data.holdout_list={syn['holdout_list']}", "--set", f"data.dictionary={syn['dictionary']}",
                     "--set", f"tracking.tracking_uri={db}"], cwd=d)
    assert code == 0, log[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"dir": out, "tracking_uri": db, "metrics": metrics, "log": log, "cwd": d}


def write_shapes_folder(root: Path, per_class: int, seed: int, size: int = 64) -> Path:
    """root/<circle|square|triangle>/NNN.jpg: one coloured shape on a grey background."""
    rng = np.random.default_rng(seed)
    shapes = {"circle": (220, 40, 40), "square": (40, 200, 40), "triangle": (40, 60, 220)}
    for name, colour in shapes.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 160, 3)))
            draw = ImageDraw.Draw(img)
            r = int(rng.integers(size // 5, size // 3))
            cx, cy = (int(v) for v in rng.integers(r + 2, size - 2 - r, 2))
            c = tuple(int(np.clip(v + rng.integers(-30, 30), 0, 255)) for v in colour)
            if name == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
            elif name == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=c)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
            img.save(d / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def launch():
    """run_cmd(cmd, cwd, timeout=400, **env) -> (exit code, stdout + stderr), with the test environment."""
    return run_cmd


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    return {"train": write_shapes_folder(d / "train", 8, seed=0), "val": write_shapes_folder(d / "val", 4, seed=1)}
