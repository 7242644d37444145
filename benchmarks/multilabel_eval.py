#!/usr/bin/env python
"""What the multi-label fine-tuning evaluation costs per rank as the val set grows (hvpmtl/train/finetune.py:
evaluate_multilabel). Each rank gathers the scores and labels of its share of the classes (C/W of them) from
every rank and computes their average precisions; this times that AP work per class at several val-set
sizes N (hvpmtl.metrics.average_precision, one sort per class), and states per rank, for W = 1, 8 and 64 ranks,
the time (per-class time x ceil(C/W)) and the gathered scores held (N x ceil(C/W) float32 scores + labels),
next to what gathering all N x C on every rank would hold.

    .venv/bin/python benchmarks/multilabel_eval.py            # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from hvpmtl.metrics import average_precision

SETS = {"VOC (5k x 20)": (5_000, 20), "COCO (40k x 80)": (40_504, 80),
        "OpenImages v6 (125k x 9.6k)": (125_436, 9_605)}


def per_class_seconds(n: int, classes: int, rng) -> float:
    scores = rng.standard_normal((n, classes)).astype(np.float32)
    labels = (rng.random((n, classes)) < 0.05).astype(np.float32)
    part = np.concatenate([scores, labels], axis=1)  # what a rank holds after the gather
    t0 = time.perf_counter()
    for j in range(classes):
        average_precision(part[:, j], part[:, classes + j])
    return (time.perf_counter() - t0) / classes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes-timed", type=int, default=20, help="classes timed per size (time is per class)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print("| val set | N | C | ranks W | classes per rank | AP time per rank (s) | scores held per rank (MB) "
          "| per node of 8 ranks (MB) | if every rank held all N x C: per node (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (n, c) in SETS.items():
        t = per_class_seconds(n, args.classes_timed, rng)
        for w in (1, 8, 64):
            k = math.ceil(c / w)
            held = n * k * 2 * 4 / 1e6  # float32 scores + labels
            everything = n * c * 2 * 4 / 1e6
            node = min(w, 8)
            print(f"| {name} | {n:,} | {c:,} | {w} | {k:,} | {t * k:.2f} | {held:,.0f} | {held * node:,.0f} | "
                  f"{everything * node:,.0f} |")
    return 0


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    raise SystemExit(main())
