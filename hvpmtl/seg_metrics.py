"""Semantic segmentation evaluation: confusion matrix, its sum over ranks, mIoU / mAcc / aAcc, and
mmseg's whole-image and sliding-window inference.

Rows of the confusion matrix are the ground-truth class, columns the prediction. Scores follow
mmseg's `IoUMetric`: per class IoU = TP / (label + pred - TP) and Acc = TP / label, computed in
float64 from the summed int64 counts; a class with a zero denominator is NaN and left out of the
mean (so a class absent from both label and prediction is not counted in mIoU; a class absent from
the labels is not counted in mAcc, while one that is only predicted counts as IoU 0).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = 255

Pair = Union[int, Sequence[int]]


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore: int = IGNORE_INDEX
                     ) -> torch.Tensor:
    """int64 [C, C] counts: cm[t, p] = pixels of true class t predicted as p; `ignore` labels skipped."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
    keep = label != ignore
    pred, label = pred[keep], label[keep]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore}, got "
                         f"[{int(label.min())}, {int(label.max())}]")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted classes must be in [0, {num_classes}), got [{int(pred.min())}, {int(pred.max())}]")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).to(torch.int64)


def sum_over_ranks(cm: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of every rank's `cm` (a copy; the input as it is without a process group).
    Counts stay int64 (or float64): exact, unlike a float32 reduction beyond 2**24 pixels."""
    if cm.dtype not in (torch.int64, torch.float64):
        raise TypeError(f"sum_over_ranks needs int64 or float64 counts for an exact sum, got {cm.dtype}")
    out = cm.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def per_class_scores(cm) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, Acc) per class as float64 fractions, NaN where the denominator is zero."""
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    tp = np.diag(cm)
    label_area, pred_area = cm.sum(axis=1), cm.sum(axis=0)
    union = label_area + pred_area - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return tp / union, tp / label_area


def seg_scores(cm) -> dict[str, float]:
    """{"mIoU", "mAcc", "aAcc"} in percent; NaN classes left out of the means (mmseg's nanmean)."""
    iou, acc = per_class_scores(cm)
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    total = cm.sum()
    if total == 0:
        raise ValueError("the confusion matrix is empty: no labelled pixel was evaluated")

    def nanmean(v):
        return float(np.nanmean(v) * 100) if np.isfinite(v).any() else float("nan")

    return {"mIoU": nanmean(iou), "mAcc": nanmean(acc), "aAcc": float(np.trace(cm) / total * 100)}


def _pair(v: Pair, what: str) -> tuple[int, int]:
    h, w = (v, v) if isinstance(v, int) else tuple(v)
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} must be positive, got {v}")
    return int(h), int(w)


def _logits_at(model, image: torch.Tensor, num_classes: int) -> torch.Tensor:
    out = model(image)
    if out.ndim != 4 or out.shape[1] != num_classes:
        raise ValueError(f"the model returned {tuple(out.shape)}, expected [B, {num_classes}, H, W]")
    if out.shape[-2:] != image.shape[-2:]:
        out = F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return out


@torch.no_grad()
def whole_inference(model, image: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits [B, C, H, W] of the whole image in one forward (resized to the input if the model does not)."""
    return _logits_at(model, image, num_classes).float()


@torch.no_grad()
def slide_inference(model, image: torch.Tensor, num_classes: int, crop: Pair, stride: Pair) -> torch.Tensor:
    """mmseg's sliding window: crops of `crop` every `stride` (the last row/column flush with the border),
    each crop's logits added in place and divided by how many crops cover a pixel.

    An image smaller than the crop in a dimension is zero-padded (the normalised mean colour) up to the
    crop for the forward and its logits cut back, so a model built for one input size (ViT positions,
    Swin windows) always sees that size; mmseg leaves such crops smaller."""
    (ch, cw), (sh, sw) = _pair(crop, "crop"), _pair(stride, "stride")
    if sh > ch or sw > cw:
        raise ValueError(f"stride {stride} larger than crop {crop} would leave pixels uncovered")
    B, _, H, W = image.shape
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    logits = image.new_zeros((B, num_classes, H, W), dtype=torch.float32)
    count = image.new_zeros((1, 1, H, W), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, H), min(c * sw + cw, W)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            tile = image[:, :, y1:y2, x1:x2]
            th, tw = tile.shape[-2:]
            if (th, tw) != (ch, cw):
                tile = F.pad(tile, (0, cw - tw, 0, ch - th))
            logits[:, :, y1:y2, x1:x2] += _logits_at(model, tile, num_classes)[:, :, :th, :tw].float()
            count[:, :, y1:y2, x1:x2] += 1
    assert bool((count > 0).all()), "sliding window left pixels uncovered"
    return logits / count


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Logits resized (bilinear, as mmseg) to a label's original (H, W) before the argmax."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


def batch_confusion(logits: torch.Tensor, sizes: torch.Tensor, labels: Sequence[torch.Tensor], num_classes: int,
                    ignore: int = IGNORE_INDEX) -> torch.Tensor:
    """The confusion matrix of an evaluation batch (hvpmtl.data.loaders.ade20k.SegEvalLoader): image b's logits
    cut to its resized size sizes[b] (the rest is batch padding), resized to its original label, argmax."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=logits.device)
    for b, label in enumerate(labels):
        h, w = (int(v) for v in sizes[b])
        pred = resize_logits(logits[b:b + 1, :, :h, :w], label.shape[-2:]).argmax(1)[0]
        cm += confusion_matrix(pred, label.to(pred.device), num_classes, ignore)
    return cm
