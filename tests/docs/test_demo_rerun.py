"""`make demo` after a finished demo: it says so, how to look at it and how to start anew, exits 0 and touches
nothing (before, `make demo ARGS="--set optim.max_steps=50"` trained nothing and overwrote the exported backbone)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hvpmtl.config import load_config
from hvpmtl.train.tracking.tracker import Tracker
from hvpmtl.train.tracking.ui import ui_link

from .checkout import REPO, checkout_env, make_checkout

pytestmark = pytest.mark.slow  # each test runs launchers/demo.sh (bash, Python processes)

UI = "http://127.0.0.1:5000"  # where the demo's `mlflow ui` command serves


def finished_demo(root, step: int = 186):
    out = root / "runs" / "demo"
    (out / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    (out / "backbone.safetensors").write_bytes(b"the finished demo's backbone")
    return out


def run_demo(root, *args: str, **env) -> subprocess.CompletedProcess:
    # a hang guard, not a timing assert: the old script generated data and trained for minutes here
    return subprocess.run(["bash", "launchers/demo.sh", *args], cwd=root, env=checkout_env(**env), capture_output=True,
                          text=True, timeout=120)


def mlflow_run(root) -> Tracker:
    """A real MLflow run of the demo in runs/mlflow.db, recorded in runs/demo/mlflow_run.json as training does."""
    cfg = load_config(REPO / "configs/demo_cpu.yaml", [f"run.output_dir={root / 'runs' / 'demo'}",
                                                        f"tracking.tracking_uri=sqlite:///{root / 'runs' / 'mlflow.db'}"])
    t = Tracker(cfg, active=True)
    t.log_metrics({"loss": 1.0}, 1)
    t.close()
    return t


def run_page_lines(root, run_id: str) -> list[str]:
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}").get_run(run_id)
    files = Path(run.info.artifact_uri.removeprefix("file://")) / "panels"
    assert files == (root / "runs" / "mlartifacts" / run_id / "artifacts" / "panels").resolve()  # as docs say
    return [f"   then open the run: {ui_link(UI, run.info.experiment_id, run_id)}",
            f"   image panels: the run page, Artifacts tab, panels/ (files: {files})"]


def test_rerunning_a_finished_demo_says_so_and_overwrites_nothing(tmp_path):
    root = make_checkout(tmp_path)
    out = finished_demo(root)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    cp = run_demo(root, "--set", "optim.max_steps=50")
    assert cp.returncode == 0, cp.stderr
    assert "the demo already ran to step 186: runs/demo holds" in cp.stdout, cp.stdout
    assert "To start anew:  make demo-clean && make demo" in cp.stdout, cp.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in cp.stdout, cp.stdout
    assert "then open http://127.0.0.1:5000" in cp.stdout, cp.stdout  # no MLflow run recorded: the front page
    assert (out / "backbone.safetensors").read_bytes() == b"the finished demo's backbone"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert not (root / "demo_data").exists(), "the finished demo was started again (it generated data)"


def test_a_finished_demo_in_another_output_dir_is_found_through_the_same_overrides(tmp_path):
    root = make_checkout(tmp_path)
    other = root / "runs" / "demo_b"
    finished_demo(root).rename(other)
    cp = run_demo(root, "--set", "run.output_dir=runs/demo_b")
    assert cp.returncode == 0, cp.stderr
    assert "the demo already ran to step 186: runs/demo_b holds" in cp.stdout, cp.stdout
    assert "To start anew:  rm -r runs/demo_b && make demo" in cp.stdout, cp.stdout


def test_a_bad_override_stops_the_demo_before_any_data_is_made(tmp_path):
    root = make_checkout(tmp_path)
    cp = run_demo(root, "--set", "optim.no_such_key=1")
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    assert "config error" in cp.stderr and "optim.no_such_key" in cp.stderr, cp.stderr
    assert not (root / "demo_data").exists()


def test_a_finished_demo_links_its_run_page_in_the_model_training_view(tmp_path):
    """Issue 21: the closing message gave only http://127.0.0.1:5000, which MLflow opens in its GenAI view."""
    root = make_checkout(tmp_path)
    finished_demo(root)
    t = mlflow_run(root)
    cp = run_demo(root)
    assert cp.returncode == 0, cp.stderr
    lines = run_page_lines(root, t.run_id)
    assert "?workflowType=machine_learning" in lines[0] and f"/runs/{t.run_id}" in lines[0]
    for line in lines:
        assert line in cp.stdout.splitlines(), cp.stdout


@pytest.mark.slow
def test_the_closing_message_links_the_run_the_demo_just_made(tmp_path):
    """The `== done` message, after a demo whose `deepspeed` only records its MLflow run (no training)."""
    from hvpmtl.data.tools.synthetic import make_synthetic

    root = make_checkout(tmp_path)
    make_synthetic(root / "demo_data", 8, seed=1, holdout=4)
    bin_ = root / "venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_ / "deepspeed").write_text(
        f"#!{sys.executable}\nfrom hvpmtl.config import load_config\nfrom hvpmtl.train.tracking.tracker import Tracker\n"
        "t = Tracker(load_config('configs/demo_cpu.yaml'), active=True)\nt.log_metrics({'loss': 1.0}, 1)\nt.close()\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in checkout_env(VENV="venv").items() if k != "MLFLOW_TRACKING_URI"}
    cp = subprocess.run(["bash", "launchers/demo.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hvpmtl").experiment_id])
    assert len(runs) == 1
    done = cp.stdout[cp.stdout.index("== done."):].splitlines()
    for line in run_page_lines(root, runs[0].info.run_id):
        assert line in done, "\n".join(done)
