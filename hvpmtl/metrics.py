"""Evaluation metrics in numpy: average precision per class, mAP, top-1.

AP is the area under the precision-recall step curve with tied scores taken together
(one threshold per distinct score), as scikit-learn's `average_precision_score`:
    AP = sum_t (R_t - R_{t-1}) * P_t   over decreasing distinct thresholds t.
Without ties this is the mean, over the positives, of the precision at each positive's rank.
"""
from __future__ import annotations

import numpy as np


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class. scores [N] (higher = more likely positive), targets [N] in {0, 1}.
    NaN when there is no positive (the class is then left out of the mean)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    targets = np.asarray(targets).reshape(-1) > 0
    if scores.shape != targets.shape:
        raise ValueError(f"average_precision: {scores.shape[0]} scores but {targets.shape[0]} targets")
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    tp = np.cumsum(t)
    # the last position of each run of equal scores is where that threshold's counts are read
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp_at, n_at = tp[last].astype(np.float64), (last + 1).astype(np.float64)
    precision = tp_at / n_at
    recall = tp_at / n_pos
    d_recall = np.diff(np.r_[0.0, recall])
    return float(np.sum(d_recall * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes of AP; scores and targets [N, C]. Classes without a positive are left out."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"mean_average_precision: scores {scores.shape} and targets {targets.shape} "
                         "must both be [N, C]")
    aps = np.array([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
    aps = aps[~np.isnan(aps)]
    if aps.size == 0:
        raise ValueError("mean_average_precision: no class has a positive sample")
    return float(aps.mean())


def top1_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose highest score is at the true class; scores [N, C], labels [N] ints."""
    scores, labels = np.asarray(scores), np.asarray(labels).reshape(-1)
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"top1_accuracy: {scores.shape[0]} rows of scores but {labels.shape[0]} labels")
    return float((scores.argmax(axis=1) == labels).mean())
