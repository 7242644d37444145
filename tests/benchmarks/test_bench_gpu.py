"""`make bench-gpu` cannot rot: its script runs here with --tiny (CPU, tiny models, CPU DALI, Triton's
interpreter) through every section, and the JSON and markdown it writes carry each one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_bench_gpu_tiny_runs_every_section_and_reports_it(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gpu import BUDGET_S, SECTIONS, TOTAL_LIMIT_S
    assert sum(BUDGET_S.values()) <= TOTAL_LIMIT_S == 480  # the full run fits 8 minutes by design

    p = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=3000)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "budget per section (s):" in log
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    s = report["sections"]
    assert list(s) == SECTIONS
    for name, entry in s.items():
        assert "error" not in entry, (name, entry, (tmp_path / f"{name}.log").read_text()[-2000:])
    assert s["peak"]["result"]["tflops"] > 0
    for name in ("step_vit", "step_swin"):
        r = s[name]["result"]
        assert r["mode"] == "zero2" and r["img_per_s"] > 0 and r["peak_mem_gib"] > 0
        assert r["tflop_per_step"] > 0 and 0 < r["mfu"]
    assert s["step_swin"]["result"]["backbone"].startswith("swin_")
    for src in ("list", "shards"):
        d = s["dali"]["result"][src]
        assert d["img_per_s"] > 0 and d["rand_augment_n"] > 0 and d["device"] == "cpu"
    loop = s["dali_loop"]["result"]
    assert loop["img_per_s_dali"] > 0 and loop["slowdown"] > 0
    k = s["kernels"]["result"]
    assert k["rc"] == 0 and k["failed"] == 0 and k["rows"] >= 4
    md = (tmp_path / "bench_gpu.md").read_text()
    for name in SECTIONS:
        assert f"| {name} |" in md
    assert "FAILED" not in md
