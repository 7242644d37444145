"""Speed and peak memory of the full HVP-MTL training step (2 student views, teacher, 4 objectives).

The batch is already on the device (no input pipeline), so this measures the step alone.
  --mode zero2: the engine's own step (hvpmtl.train.pretrain.Pretrainer) under DeepSpeed ZeRO-2
  --mode eager: the same Student/Teacher with plain torch AdamW and autocast, no DeepSpeed
Prints one table row per configuration and a JSON line (for docs/BENCHMARKS.md). The FLOPs of one step are
counted once (torch.utils.flop_counter: matmuls, convolutions and attention, forward and backward); with
--peak-tflops (the card's measured bf16 matmul peak, as bench_gpu.py measures it) the row gets the MFU.

  python benchmarks/train_step.py --backbone vit_base_patch16_224 --batch 128 --mode zero2 eager
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import import_package  # noqa: E402

import_package()


def make_cfg(a, out_dir):
    from hvpmtl.config import load_config
    sets = [f"model.backbone={a.backbone}", f"model.img_size={a.img_size}", f"data.img_size={a.img_size}",
            f"data.num_classes={a.classes}", f"model.decoder_groups={a.decoder_groups}",
            f"model.decoder_layers={a.decoder_layers}", f"model.grad_checkpointing={str(a.grad_ckpt).lower()}",
            f"optim.micro_batch_size={a.batch}", "data.format=tensors", f"run.output_dir={out_dir}",
            f"run.precision={a.precision}", "tracking.enabled=false", "run.progress_bar=false",
            f"run.compile={str(a.compile).lower()}"]
    return load_config(getattr(a, "config", None), sets)


def random_batch(cfg, patch, device, dtype):
    B, s = cfg.optim.micro_batch_size, cfg.model.img_size
    from hvpmtl.data.loaders.masks import SimMIMMaskGenerator  # the loaders' own masks, made on the device
    mask = SimMIMMaskGenerator(s, cfg.data.mask_patch_size, patch, cfg.data.mask_ratio)(
        torch.arange(B, device=device), cfg.data.seed, 0)
    return {"view1": torch.randn(B, 3, s, s, device=device, dtype=dtype),
            "view2": torch.randn(B, 3, s, s, device=device, dtype=dtype),
            "mask": mask, "labels": (torch.rand(B, cfg.data.num_classes, device=device) < 0.001).float()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_zero2(a, cfg):
    from hvpmtl.train.pretrain import Pretrainer
    t = Pretrainer(cfg, resume="none")
    batch = random_batch(cfg, t.meta.student.backbone.patch_size, t.device, t.input_dtype)

    def step():
        assert not t.meta.forward_backward(batch, step=1).nonfinite
        t.meta.update_teacher(t.momentum[1])
    return t.device, step


def bench_eager(a, cfg):
    from hvpmtl.models.meta_arch import Student, Teacher
    from hvpmtl.train.optim import build_optimizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    st = Student(cfg).to(device)
    te = Teacher(st).to(device)
    if cfg.run.compile:
        for m in (st.backbone, st.label_decoder, te.backbone, te.label_decoder):
            m.compile()
    opt = build_optimizer(st, cfg.optim, st.no_weight_decay_names())
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    batch = random_batch(cfg, st.backbone.patch_size, device, dtype)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            sim = te(batch["view1"])
            out = st(batch["view1"], batch["view2"], batch["mask"], batch["labels"], teacher_sim=sim.float())
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(st.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        te.update(st, 0.995)
    return device, step


def run(a, mode):
    import tempfile
    cfg = make_cfg(a, tempfile.mkdtemp())
    device, step = (bench_zero2 if mode == "zero2" else bench_eager)(a, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(a.warmup):
        step()
    sync(device)
    flops = count_flops(step)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the process's peak RSS: an upper bound of what the step holds on the CPU
        import resource
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak = getattr(a, "peak_tflops", 0) or 0
    return {"tflop_per_step": flops / 1e12, "achieved_tflops": flops / med / 1e12,
            "mfu": flops / med / (peak * 1e12) if peak else None, "peak_tflops": peak or None,
            **{"mode": mode, "backbone": a.backbone, "batch": a.batch, "img_size": a.img_size, "classes": a.classes,
            "decoder_groups": a.decoder_groups, "precision": a.precision, "compile": a.compile,
            "img_per_s": a.batch / med, "step_ms": med * 1e3, "peak_mem_gib": mem,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}}


def count_flops(step) -> float:
    """FLOPs of one call of step() (forward + backward + optimizer; the optimizer's elementwise work is not
    counted, as MFU conventions do)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="base experiment YAML (default: the built-in defaults, paper-sized heads)")
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=11166)
    p.add_argument("--decoder-groups", type=int, default=0)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--mode", nargs="+", default=["zero2"], choices=["zero2", "eager"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto: CUDA when there, else CPU")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the card's bf16 matmul peak, for the MFU column")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    a = p.parse_args(argv)
    if a.precision == "auto":
        a.precision = "bf16" if torch.cuda.is_available() else "fp32"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    rows = [run(a, m) for m in a.mode]
    print(f"{'mode':6} {'backbone':28} {'bs':>4} {'C':>6} {'G':>4} {'prec':5} {'cmp':3} {'img/s':>8} {'ms':>8} "
          f"{'GiB':>6} {'TFLOP':>7} {'MFU':>5}")
    for r in rows:
        mfu = f"{100 * r['mfu']:4.1f}%" if r["mfu"] else "  n/a"
        print(f"{r['mode']:6} {r['backbone']:28} {r['batch']:4d} {r['classes']:6d} {r['decoder_groups']:4d} "
              f"{r['precision']:5} {'y' if r['compile'] else 'n':3} {r['img_per_s']:8.1f} {r['step_ms']:8.1f} "
              f"{r['peak_mem_gib']:6.1f} {r['tflop_per_step']:7.3f} {mfu}")
    for r in rows:
        print("JSON " + json.dumps(r))


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    main()
