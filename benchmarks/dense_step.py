#!/usr/bin/env python
"""Training-step cost of the paper's dense fine-tunings (docs/BENCHMARKS.md, `make bench-gpu`): Mask R-CNN 1x on
Swin-B (torchvision's detector on hvpmtl's backbone pyramid, the recipe's 2 images per GPU at the multi-scale
training sizes, long side <= 1333) and UperNet 160k on Swin-B (2 crops of 512 per GPU), the real models of
hvpmtl/models/ with the recipe's AdamW, bf16 autocast on a GPU, fp32 on the CPU. Images are random pixels with
random objects (detection needs boxes and masks); speed does not depend on their content.

    python benchmarks/dense_step.py --device cuda            # one GPU: both rows, JSON lines
    python benchmarks/dense_step.py --device cpu --tiny      # the CPU twin (ViT-Tiny, small sizes, 64-wide heads,
                                                             # few RoIs): bench_gpu --tiny

Each row: images per second (median of --steps timed steps after --warmup), peak memory (GPU: max allocated;
CPU: max RSS) and the step time.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# det_kwargs: to build_maskrcnn (the paper row: its defaults, torchvision's heads); seg_channels: UperNet's decoder
PAPER = {"backbone": "swin_base_patch4_window7_224", "det_sizes": (480, 800), "det_max": 1333, "det_batch": 2,
         "seg_crop": 512, "seg_batch": 2, "classes_det": 80, "classes_seg": 150, "det_kwargs": {},
         "seg_channels": 512}
# the CPU twin: the same models, narrow (64-wide pyramid, FPN and decoder) and with few proposals and sampled RoIs
# (the per-RoI heads dominate a CPU step otherwise: ~30 s a step at the paper's widths on 2 shared cores)
TINY = {"backbone": "vit_tiny_patch16_224", "det_sizes": (96, 128), "det_max": 160, "det_batch": 2,
        "seg_crop": 64, "seg_batch": 2, "classes_det": 4, "classes_seg": 5,
        "det_kwargs": {"fpn_channels": 64, "vit_width": 64, "rpn_pre_nms_top_n_train": 200,
                       "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 64},
        "seg_channels": 64}


def _objects(h: int, w: int, n: int, classes: int, g: torch.Generator) -> dict:
    x1 = torch.randint(0, w // 2, (n,), generator=g).float()
    y1 = torch.randint(0, h // 2, (n,), generator=g).float()
    x2 = x1 + torch.randint(16, w // 2, (n,), generator=g).float()
    y2 = y1 + torch.randint(16, h // 2, (n,), generator=g).float()
    masks = torch.zeros(n, h, w, dtype=torch.uint8)
    for i in range(n):
        masks[i, int(y1[i]):int(y2[i]), int(x1[i]):int(x2[i])] = 1
    return {"boxes": torch.stack([x1, y1, x2, y2], 1), "labels": torch.randint(1, classes + 1, (n,), generator=g),
            "masks": masks}


def _timed(step, warmup: int, steps: int, device: torch.device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def detection_row(p: dict, device: torch.device, warmup: int, steps: int) -> dict:
    from hvpmtl.models.detector import build_maskrcnn

    g = torch.Generator().manual_seed(0)
    short = tuple(range(p["det_sizes"][0], p["det_sizes"][1] + 1, 32))
    model = build_maskrcnn(p["backbone"], p["classes_det"] + 1, min_size=short, max_size=p["det_max"],
                           **p["det_kwargs"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    h, w = p["det_sizes"][1], int(p["det_sizes"][1] * 4 / 3)
    images = [torch.rand(3, h, w, generator=g).to(device) for _ in range(p["det_batch"])]
    targets = [{k: v.to(device) for k, v in _objects(h, w, 8, p["classes_det"], g).items()} for _ in images]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = statistics.median(_timed(step, warmup, steps, device))
    return {"row": "Mask R-CNN 1x", "backbone": p["backbone"], "batch": p["det_batch"], "size": f"{h}x{w}",
            "img_per_s": p["det_batch"] / t, "step_s": t, "mem_gib": _memory_gib(device)}


def segmentation_row(p: dict, device: torch.device, warmup: int, steps: int) -> dict:
    from hvpmtl.models.segmenter import build_upernet

    g = torch.Generator().manual_seed(0)
    crop, b = p["seg_crop"], p["seg_batch"]
    model = build_upernet(p["backbone"], p["classes_seg"], img_size=crop, decoder_channels=p["seg_channels"],
                          aux_head=True).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
    x = torch.rand(b, 3, crop, crop, generator=g).to(device)
    y = torch.randint(0, p["classes_seg"], (b, crop, crop), generator=g).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits, aux = model(x, with_aux=True)
        loss = F.cross_entropy(logits.float(), y) + 0.4 * F.cross_entropy(aux.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = statistics.median(_timed(step, warmup, steps, device))
    return {"row": "UperNet 160k", "backbone": p["backbone"], "batch": b, "size": f"{crop}x{crop}",
            "img_per_s": b / t, "step_s": t, "mem_gib": _memory_gib(device)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="ViT-Tiny at small sizes: the CPU twin of the tests")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", choices=("detection", "segmentation"), default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    p = TINY if args.tiny else PAPER
    rows = []
    for name, fn in (("detection", detection_row), ("segmentation", segmentation_row)):
        if args.only in (None, name):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(fn(p, device, args.warmup, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    sys.exit(main())
