"""`make demo` after a finished demo: it says so, how to look at it and how to start anew, exits 0 and touches
nothing (before, `make demo ARGS="--set optim.max_steps=50"` trained nothing and overwrote the exported backbone)."""
from __future__ import annotations

import subprocess

from .checkout import checkout_env, make_checkout


def finished_demo(root, step: int = 186):
    out = root / "runs" / "demo"
    (out / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    (out / "backbone.safetensors").write_bytes(b"the finished demo's backbone")
    return out


def run_demo(root, *args: str) -> subprocess.CompletedProcess:
    # a hang guard, not a timing assert: the old script generated data and trained for minutes here
    return subprocess.run(["bash", "launchers/demo.sh", *args], cwd=root, env=checkout_env(), capture_output=True,
                          text=True, timeout=120)


def test_rerunning_a_finished_demo_says_so_and_overwrites_nothing(tmp_path):
    root = make_checkout(tmp_path)
    out = finished_demo(root)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    cp = run_demo(root, "--set", "optim.max_steps=50")
    assert cp.returncode == 0, cp.stderr
    assert "the demo already ran to step 186: runs/demo holds" in cp.stdout, cp.stdout
    assert "To start anew:  make demo-clean && make demo" in cp.stdout, cp.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in cp.stdout, cp.stdout
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
