"""benchmarks/dense_step.py's CPU twin: both rows (Mask R-CNN, UperNet) run a real training step on the CPU and
report their figures; the GPU rows are the same code at the paper's sizes (make bench-gpu)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_rows_run_and_report(tmp_path):
    cp = subprocess.run([sys.executable, str(ROOT / "benchmarks/dense_step.py"), "--device", "cpu", "--tiny",
                         "--warmup", "1", "--steps", "2"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-3000:]
    rows = [json.loads(line) for line in cp.stdout.splitlines() if line.startswith("{")]
    assert [r["row"] for r in rows] == ["Mask R-CNN 1x", "UperNet 160k"]
    for r in rows:
        assert r["img_per_s"] > 0 and r["step_s"] > 0 and r["mem_gib"] > 0 and r["batch"] == 2
