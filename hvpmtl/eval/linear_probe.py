"""Linear probe on frozen features: logistic regression trained by full-batch L-BFGS.

Features are standardised with the probe-train split's mean and std. Multi-label targets use a
sigmoid per class (binary cross-entropy) and are scored by mAP; single-label targets use softmax
cross-entropy and top-1. The L2 penalty is picked from a small grid on a held-back fifth of the
probe-train split, then the probe is refitted on all of it (SimCLR/DINO sweep the same way).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hvpmtl.metrics import average_precision, mean_average_precision, top1_accuracy

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
SMALL_PROBLEM = 2**26  # N x D x C below which CPU fits run on one thread


@contextlib.contextmanager
def small_cpu_problem(size: int, device):
    """One intra-op thread for a small CPU problem: L-BFGS makes thousands of tiny ops, and OpenMP's
    thread hand-offs cost more than they save (tens of times more on a loaded machine)."""
    if torch.device(device).type != "cpu" or size >= SMALL_PROBLEM or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class LinearProbe:
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]
    weight_decay: float

    @torch.no_grad()
    def scores(self, x) -> np.ndarray:
        x = torch.as_tensor(np.asarray(x), dtype=self.weight.dtype, device=self.weight.device)
        return (((x - self.mean) / self.std) @ self.weight + self.bias).cpu().numpy()


def _loss(logits, y, multilabel: bool):
    if multilabel:  # sum over classes, mean over samples
        return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / logits.shape[0]
    return F.cross_entropy(logits, y)


def fit_linear(x, y, *, multilabel: bool, num_classes: int, weight_decay: float = 1e-3, max_iter: int = 100,
               device="cpu", dtype=torch.float32, tolerance_grad: float = 1e-6) -> LinearProbe:
    """x [N, D] features; y [N, C] in {0, 1} (multi-label) or [N] class ids. Minimises
    loss + weight_decay / 2 * ||W||^2 from zero weights (a convex problem: the result does not
    depend on a seed)."""
    x = torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"linear probe: features must be a non-empty [N, D] array, got {tuple(x.shape)}")
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    xs = (x - mean) / std
    if multilabel:
        yt = torch.as_tensor(np.asarray(y), dtype=dtype, device=device)
    else:
        yt = torch.as_tensor(np.asarray(y), dtype=torch.long, device=device)
    W = torch.zeros(x.shape[1], num_classes, dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=dtype, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=tolerance_grad, tolerance_change=tolerance_grad * 1e-3)

    def closure():
        opt.zero_grad()
        loss = _loss(xs @ W + b, yt, multilabel) + 0.5 * weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), small_cpu_problem(x.numel() * num_classes, device):
        opt.step(closure)
    return LinearProbe(mean, std, W.detach(), b.detach(), weight_decay)


def score(scores: np.ndarray, y, multilabel: bool) -> float:
    """mAP (multi-label) or top-1 (single-label), in percent."""
    if multilabel:
        return 100.0 * mean_average_precision(scores, np.asarray(y) > 0)
    return 100.0 * top1_accuracy(scores, np.asarray(y))


def linear_probe(train_x, train_y, test_x, test_y, *, multilabel: bool, num_classes: int,
                 weight_decays: Sequence[float] = WEIGHT_DECAYS, max_iter: int = 100, device="cpu",
                 progress=None) -> dict:
    """Fit on (train_x, train_y), report on (test_x, test_y). `progress(msg)` hears of each fit (minutes each on
    a large data set).

    Returns {"map" or "top1": percent, "weight_decay": the chosen L2, and for multi-label
    "class_ap": per-class AP in percent}."""
    say = progress or (lambda msg: None)
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y = np.asarray(train_y)
    if multilabel:
        train_y = (train_y > 0).astype(np.float32)
    weight_decays = list(weight_decays)
    chosen = weight_decays[0]
    n = train_x.shape[0]
    if len(weight_decays) > 1 and n >= 10:
        # every fifth sample (a fixed, order-based split) is held back to pick the L2 strength
        val = np.arange(n) % 5 == 4
        best = -np.inf
        for i, wd in enumerate(weight_decays):
            say(f"linear probe: weight decay {wd:g} ({i + 1}/{len(weight_decays)}) on four fifths of the fit split")
            p = fit_linear(train_x[~val], train_y[~val], multilabel=multilabel, num_classes=num_classes,
                           weight_decay=wd, max_iter=max_iter, device=device)
            try:
                s = score(p.scores(train_x[val]), train_y[val], multilabel)
            except ValueError:  # no positive in the held-back fifth: cannot rank, keep the first
                s = -np.inf
            if s > best:
                best, chosen = s, wd
    say(f"linear probe: final fit with weight decay {chosen:g}")
    probe = fit_linear(train_x, train_y, multilabel=multilabel, num_classes=num_classes, weight_decay=chosen,
                       max_iter=max_iter, device=device)
    key = "map" if multilabel else "top1"
    scores = probe.scores(test_x)
    out = {key: score(scores, test_y, multilabel), "weight_decay": chosen}
    if multilabel:  # per class, NaN where the test split has no positive
        y = np.asarray(test_y) > 0
        out["class_ap"] = [100.0 * average_precision(scores[:, c], y[:, c]) for c in range(num_classes)]
    return out
