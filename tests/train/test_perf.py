"""hvpmtl.train.perf: FLOPs counted by FlopCounterMode against hand-derived counts, the peak table, the step's
perf/* figures from known times, and the figures of the real loop (1 rank, DeepSpeed ZeRO-2 on the CPU)."""
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hvpmtl.train import perf

ROOT = Path(__file__).resolve().parents[2]


def test_flops_of_a_linear_forward_and_backward_are_six_b_in_out():
    b, n_in, n_out = 8, 32, 16
    layer = torch.nn.Linear(n_in, n_out, bias=False)
    x = torch.randn(b, n_in, requires_grad=True)
    _, flops = perf.count_flops(lambda: layer(x).sum().backward())
    # forward x W^T: 2 b in out; backward: dL/dx and dL/dW, 2 b in out each
    assert flops == 6 * b * n_in * n_out


def test_peak_comes_from_the_override_the_gpu_table_or_a_measured_cpu_matmul():
    assert perf.table_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert perf.table_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5  # not the SXM figure
    assert perf.table_peak_tflops("NVIDIA H200", "fp32") == 494.7
    assert perf.table_peak_tflops("Some Other GPU", "bf16") == 0.0
    assert perf.peak_tflops(torch.device("cpu"), "fp32", override=123.0) == (123.0, "run.peak_tflops")
    measured, source = perf.peak_tflops(torch.device("cpu"), "fp32")
    assert source == "measured (CPU fp32 matmul)" and 1e-4 < measured < 100


def test_step_figures_from_known_times():
    p = perf.StepPerf(peak_tflops_per_device=2.0, world=2)
    p.flops_per_image = 1e12
    p.data_wait_s, p.step_s, p.optimizer_s, p.other_s = 1.0, 3.0, 0.5, 0.0
    f = p.figures(images=16, device=torch.device("cpu"))
    assert f["perf/data_wait_frac"] == pytest.approx(0.25)
    assert f["perf/fwd_bwd_s"] == pytest.approx(2.5) and f["perf/optimizer_s"] == 0.5
    assert f["perf/img_per_s"] == pytest.approx(4.0)
    # 16 images x 1 TFLOP over 4 s on 2 devices: 2 TFLOP/s per device, the whole peak
    assert f["perf/tflops"] == pytest.approx(2.0) and f["perf/mfu"] == pytest.approx(1.0)
    assert f["perf/mem_peak_gb"] > 0
    assert p.step_s == p.data_wait_s == p.optimizer_s == 0.0  # reset for the next step


def test_the_loop_logs_perf_figures_and_counts_the_real_steps_flops(tmp_path):
    from hvpmtl.config import load_config
    from hvpmtl.train.pretrain import Pretrainer

    cfg = load_config(ROOT / "configs/test_tiny.yaml",
                      [f"run.output_dir={tmp_path / 'run'}", "tracking.enabled=false", "optim.max_steps=2",
                       "run.checkpoint_every=1000", f"run.ds_config={ROOT / 'ds_configs/zero2.json'}"])
    t = Pretrainer(cfg, resume="none")
    assert t.run() == 0
    rows = [json.loads(line) for line in (t.out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        for k in ("perf/data_wait_frac", "perf/mfu", "perf/tflops", "perf/mem_peak_gb", "perf/fwd_bwd_s",
                  "perf/optimizer_s", "perf/ckpt_eval_s"):
            assert k in r, k
        assert 0 <= r["perf/data_wait_frac"] < 1 and r["perf/optimizer_s"] > 0
        images = cfg.optim.micro_batch_size
        assert r["perf/tflops"] == pytest.approx(t.perf.flops_per_image * images / r["perf/step_s"] / 1e12)
        assert r["perf/mfu"] == pytest.approx(r["perf/tflops"] / t.perf.peak)
    # the real step: teacher forward, two student views forward and backward (x3), heads: at least 6 backbone
    # forwards' worth of FLOPs per image
    backbone = t.meta.student.backbone
    x = torch.randn(1, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        backbone(x)
    assert t.perf.flops_per_image >= 6 * c.get_total_flops()
    t.tracker.close()
