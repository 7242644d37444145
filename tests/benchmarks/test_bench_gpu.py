"""`make bench-gpu` cannot rot: its script runs here with --tiny (CPU, tiny models, CPU DALI, Triton's
interpreter) through every kind of section (ViT's step as shipped, with no ZeRO, with accumulation and with view 1
masked; Swin's as shipped), and the JSON and markdown it writes carry each one; every full-size variant's config is
built and checked as the GPU run will."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402

# every code path once: ViT at stage 2 (as shipped) and 0 (no ZeRO optimizer; stage 1 is stage 2's optimizer, its
# config is checked below and its engine in tests/train/test_zero_stages.py), accumulation, masked view 1; Swin
# as shipped
TINY_SECTIONS = ["peak", "data", "dali", "step_vit_zero2", "step_vit_zero0", "step_vit_accum", "step_vit_masked",
                 "step_swin_zero2", "kernels", "dense"]
DATA = {"root": "/data/images", "list_file": "/data/images/train.txt", "shards": "/data/shards"}


def test_budgets_fit_eight_minutes_and_cover_the_table():
    assert sum(bench_gpu.BUDGET_S.values()) <= bench_gpu.TOTAL_LIMIT_S == 480  # the full run fits 8 minutes
    assert list(bench_gpu.BUDGET_S) == bench_gpu.SECTIONS
    variants = set(bench_gpu.STEP_VARIANTS.values())
    for b in ("vit", "swin"):
        assert {(b, s, "micro", "unmasked") for s in (0, 1, 2)} <= variants
        assert (b, 2, "accum", "unmasked") in variants and (b, 2, "micro", "masked") in variants


@pytest.mark.parametrize("name", list(bench_gpu.STEP_VARIANTS))
def test_full_size_variant_configs_are_the_paper_configs_with_one_change(name, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gpu, "_on_gpu", lambda tiny: not tiny)  # as on the GPU machine
    which, stage, batching, view1 = bench_gpu.STEP_VARIANTS[name]
    cfg = bench_gpu.step_config(False, name, DATA, str(tmp_path))
    shipped = bench_gpu.load_paper_config(which)
    assert cfg.model == shipped.model and cfg.objectives.asl == shipped.objectives.asl
    assert cfg.data.img_size == 224 and cfg.data.rand_augment_n == shipped.data.rand_augment_n
    assert cfg.data.format == "tencent" and cfg.data.device == "gpu" and cfg.run.precision == "bf16"
    assert cfg.run.ds_config.endswith(f"zero{stage}.json") and Path(cfg.run.ds_config).is_file()
    assert cfg.objectives.swav.view1 == view1
    per_step = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps
    assert per_step == shipped.optim.micro_batch_size  # the same images per optimizer step in every variant
    if batching == "accum":
        assert cfg.optim.micro_batch_size == 16 and cfg.optim.grad_accum_steps > 1
    else:
        assert cfg.optim.grad_accum_steps == 1
    assert cfg.objectives.swav.queue_length % per_step == 0


@pytest.mark.slow
def test_bench_gpu_tiny_runs_every_kind_of_section_and_reports_it(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--tiny", "--out", str(tmp_path),
                        "--sections", ",".join(TINY_SECTIONS)], cwd=ROOT, capture_output=True, text=True, timeout=3000)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "budget per section (s):" in log
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    # what the table was measured with: the code revision and the packages' versions, in the JSON and the table
    prov = report["provenance"]
    assert prov["revision"] not in ("", "unknown") and prov["versions"]["torch"] and prov["versions"]["deepspeed"]
    assert f"code {prov['revision']}; python " in (tmp_path / "bench_gpu.md").read_text()
    assert log.startswith("# code ")
    s = report["sections"]
    assert list(s) == TINY_SECTIONS
    for name, entry in s.items():
        assert "error" not in entry, (name, entry, (tmp_path / f"{name}.log").read_text()[-2000:])
    assert s["peak"]["result"]["tflops"] > 0
    for name in TINY_SECTIONS:
        if name not in bench_gpu.STEP_VARIANTS:
            continue
        which, stage, batching, view1 = bench_gpu.STEP_VARIANTS[name]
        r = s[name]["result"]
        assert r["zero_stage"] == stage and r["view1"] == view1, name  # the engine really ran that stage
        assert (r["micro"], r["accum"]) == ((2, 1) if batching == "micro" else (1, 2)), name
        assert r["img_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["tflop_per_image"] > 0 and 0 < r["mfu"]
        assert 0 <= r["data_wait_frac"] < 1 and r["data_device"] == "cpu"
    assert s["step_swin_zero2"]["result"]["backbone"].startswith("swin_")
    # the unmasked view 1 costs one backbone forward and backward more than the masked one
    assert s["step_vit_zero2"]["result"]["tflop_per_image"] > s["step_vit_masked"]["result"]["tflop_per_image"]
    for src in ("list", "shards"):
        d = s["dali"]["result"][src]
        assert d["img_per_s"] > 0 and d["rand_augment_n"] == 2 and d["rand_augment_m"] == 9 and d["device"] == "cpu"
    k = s["kernels"]["result"]
    assert k["rc"] == 0 and k["failed"] == 0 and k["rows"] >= 4
    dense = s["dense"]["result"]  # benchmarks/dense_step.py's rows: a real Mask R-CNN and UperNet training step
    assert dense["rc"] == 0 and [x["row"] for x in dense["rows"]] == ["Mask R-CNN 1x", "UperNet 160k"]
    assert all(x["img_per_s"] > 0 and x["mem_gib"] > 0 and x["batch"] == 2 for x in dense["rows"])
    md = (tmp_path / "bench_gpu.md").read_text()
    for name in TINY_SECTIONS:
        assert f"| {name} |" in md
    assert "| vit_tiny_patch16_224 32 | accum | 2 | 1 x 2 | unmasked |" in md
    assert "FAILED: exit" not in md
