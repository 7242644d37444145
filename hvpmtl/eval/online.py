"""Online evaluation during pre-training: kNN and linear-probe mAP on the labelled held-out split.

Run on every rank every `run.eval_every` steps by the `OnlineEval` step hook (hvpmtl/eval/hooks.py), which
keeps one `OnlineEvaluator` (and so one held-out loader) for the run. Each rank extracts features for
its share of `data.holdout_list` (the eval loader gives rank r the ids r, r+W, ...); the features
are gathered on every rank, rank 0 fits the probes and broadcasts the numbers, so every rank
returns the same dict and no rank waits on a long single-rank job at a barrier.

The held-out images are split in two by their position in the list: even positions train the
probes, odd positions test them (fixed, so numbers are comparable across steps and runs).

A new run is also evaluated at step 0 (its random init): every later result is printed beside those numbers,
and the MLflow charts start from them.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.distributed as dist

from hvpmtl.config import ConfigError, ExperimentConfig
from hvpmtl.dist import all_gather_rows, distributed
from hvpmtl.eval.features import extract_features, split_halves
from hvpmtl.eval.knn import knn_eval
from hvpmtl.eval.linear_probe import linear_probe

EVAL_BATCH_SIZE = 64


def probe_scores(features: np.ndarray, labels: np.ndarray, index: np.ndarray, *, num_classes: int,
                 knn_k: int = 20, knn_temperature: float = 0.07, device="cpu") -> dict[str, float]:
    """kNN and linear-probe mAP (percent) of multi-label features split by `split_halves`."""
    order = np.argsort(index, kind="stable")
    features, labels, index = features[order], labels[order], index[order]
    tr, te = split_halves(index)
    if tr.sum() == 0 or te.sum() == 0:
        raise ValueError(f"online eval: the held-out split has {len(index)} image(s); it needs at least 2")
    y = labels > 0
    knn = knn_eval(features[tr], y[tr], features[te], y[te], multilabel=True, num_classes=num_classes, k=knn_k,
                   temperature=knn_temperature, device=device)
    lin = linear_probe(features[tr], y[tr], features[te], y[te], multilabel=True, num_classes=num_classes,
                       device=device)
    return {"eval/knn_map": knn["map"], "eval/linear_map": lin["map"]}


def console_line(step: int, scores: dict[str, float], random_init: dict[str, float] | None) -> str:
    """One line for the console: the step's kNN and linear-probe mAP, with the random init's beside them."""
    knn, lin = scores["eval/knn_map"], scores["eval/linear_map"]
    if step == 0:
        return f"online eval step 0 (random init): kNN mAP {knn:.1f}, linear-probe mAP {lin:.1f}"
    if not random_init:
        return f"online eval step {step}: kNN mAP {knn:.1f}, linear-probe mAP {lin:.1f}"
    return (f"online eval step {step}: kNN mAP {knn:.1f} (random init: {random_init['eval/knn_map']:.1f}), "
            f"linear-probe mAP {lin:.1f} (random init: {random_init['eval/linear_map']:.1f})")


def random_init_scores(metrics_path: str | os.PathLike) -> dict[str, float] | None:
    """The step-0 online scores a run's metrics.jsonl holds (the last ones: a folder started afresh), or None.
    Read as a stream, parsing only step-0 rows (the file has a row per step)."""
    found = None
    try:
        with open(metrics_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.startswith('{"step": 0,'):
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "eval/knn_map" in row and "eval/linear_map" in row:
                    found = {k: float(row[k]) for k in ("eval/knn_map", "eval/linear_map")}
    except OSError:
        return None
    return found


class OnlineEvaluator:
    """kNN and linear-probe mAP of a backbone on data.holdout_list, for one rank of a run. The held-out list is
    read and checked once, when the evaluator is made; each call is collective (every rank calls it)."""

    def __init__(self, cfg: ExperimentConfig, *, device, rank: int, world_size: int):
        if not cfg.data.holdout_list:
            raise ConfigError("run.eval_every > 0 needs data.holdout_list (a labelled held-out list file; "
                              "`hvpmtl data make-synthetic --holdout N` writes one)")
        from hvpmtl.data.loaders.pretrain import build_eval_loader

        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world_size
        local_rank = device.index if getattr(device, "type", "cpu") == "cuda" and device.index is not None else 0
        self.loader = build_eval_loader(cfg.data, batch_size=EVAL_BATCH_SIZE, rank=rank, world_size=world_size,
                                        local_rank=local_rank, dtype=torch.float32)

    def __call__(self, backbone) -> dict[str, float]:
        """{"eval/knn_map", "eval/linear_map"} in percent, identical on every rank. The backbone's train/eval
        mode is restored."""
        d, device, world_size = self.cfg.data, self.device, self.world
        if len(self.loader):
            out = extract_features(backbone, self.loader, device=device)
        else:  # fewer held-out images than ranks: this rank still joins the gathers
            out = {"features": np.zeros((0, backbone.embed_dim), np.float32),
                   "labels": np.zeros((0, d.num_classes), np.float32), "index": np.zeros(0, np.int64)}
        feats = all_gather_rows(torch.from_numpy(out["features"]).to(device), world_size)
        labels = all_gather_rows(torch.from_numpy(out["labels"].astype(np.float32)).to(device), world_size)
        index = all_gather_rows(torch.from_numpy(out["index"]).to(device), world_size)
        result = torch.zeros(3, dtype=torch.float64, device=device)  # knn, linear, ok
        error = None
        if self.rank == 0:
            try:
                r = probe_scores(feats.cpu().numpy(), labels.cpu().numpy(), index.cpu().numpy(),
                                 num_classes=d.num_classes, device=device)
                result = torch.tensor([r["eval/knn_map"], r["eval/linear_map"], 1.0], dtype=torch.float64,
                                      device=device)
            except Exception as e:  # noqa: BLE001 — the other ranks must hear of it, not wait for ever
                error = e
        if distributed(world_size):
            dist.broadcast(result, src=0)
        if error is not None:
            raise error
        if result[2] == 0:
            raise RuntimeError("online evaluation failed on rank 0 (see its log)")
        return {"eval/knn_map": float(result[0]), "eval/linear_map": float(result[1])}


def evaluate_online(backbone, cfg: ExperimentConfig, *, device, rank: int, world_size: int) -> dict[str, float]:
    """One evaluation with a fresh evaluator (collective: every rank must call it)."""
    return OnlineEvaluator(cfg, device=device, rank=rank, world_size=world_size)(backbone)
