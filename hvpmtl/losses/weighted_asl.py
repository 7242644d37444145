"""Weighted asymmetric loss (HVP-MTL's multi-label objective, ASL-style).

    loss = - sum_{b,c} [ y * eta * (1-p)^gamma_pos * log(p) + (1-y) * p_m^gamma_neg * log(1-p_m) ]

with p = sigmoid(z), p_m = max(p - clip, 0) (p_m = p when clip == 0) and y a target confidence in
[0, 1]. Paper defaults: eta=10, gamma_pos=4, gamma_neg=1, clip=0. Original ASL: eta=1, gamma_pos=0,
gamma_neg=4, clip=0.05.

`weighted_asl_reference` is the fp32 PyTorch reference (autograd gives its gradient); the Triton twin
`hvpmtl.kernels.weighted_asl.weighted_asl` has the same signature and takes its argument checks from
here. This file imports no kernel: `hvpmtl.losses.asl.WeightedASLLoss` picks one of the two. Both
compute in fp32 whatever the logits' dtype (float64 stays float64 here, so gradcheck can run on the
reference), take every log from z through softplus (ASL's own code gives NaN in fp16: eps rounds to
0, ASL#53) and return a 0-dim tensor holding the sum.

Targets are dense ([B, C], any dtype, same shape as the logits) or `SparseTargets`: per-row lists
of (class index, confidence), padded with index -1. A class listed twice in a row takes the larger
confidence.
"""
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F


class SparseTargets(NamedTuple):
    """Per-row positive classes: indices [B, L] int64 (pad with -1), values [B, L] confidences in [0, 1]."""

    indices: torch.Tensor
    values: torch.Tensor


Targets = Union[torch.Tensor, SparseTargets]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs, float64 kept (for float64 checks of the reference)."""
    return torch.promote_types(dtype, torch.float32)


def check_logits(logits: torch.Tensor) -> None:
    if not torch.is_floating_point(logits):
        raise TypeError(f"weighted_asl: logits must be a float tensor, got {logits.dtype}")


def check_sparse_targets(logits: torch.Tensor, targets: SparseTargets) -> None:
    """Shapes, dtypes and ranges of sparse targets.

    The range check needs the values: on CPU it raises ValueError; on CUDA it is a device-side
    assertion (torch._assert_async), so the call stays free of host syncs (and CUDA-graph capturable).
    """
    idx, val = targets.indices, targets.values
    if logits.dim() != 2:
        raise ValueError(f"weighted_asl: sparse targets need 2-D logits [B, C], got shape {tuple(logits.shape)}")
    if idx.dim() != 2 or idx.shape != val.shape or idx.shape[0] != logits.shape[0]:
        raise ValueError(
            f"weighted_asl: SparseTargets indices {tuple(idx.shape)} and values {tuple(val.shape)} must both be "
            f"[B, L] with B = {logits.shape[0]}"
        )
    if idx.dtype not in (torch.int64, torch.int32) or not torch.is_floating_point(val):
        raise TypeError(
            f"weighted_asl: SparseTargets needs integer indices and float values, got {idx.dtype} and {val.dtype}"
        )
    if idx.device != logits.device or val.device != logits.device:
        raise ValueError("weighted_asl: SparseTargets must be on the logits' device")
    if idx.numel() == 0:
        return
    valid = idx >= 0
    bad = (idx >= logits.shape[1]).any() | (idx < -1).any() | (valid & ((val < 0) | (val > 1))).any()
    msg = (
        f"weighted_asl: SparseTargets indices must lie in [-1, {logits.shape[1] - 1}] (-1 = padding) "
        "and values in [0, 1]"
    )
    if bad.is_cuda:
        torch._assert_async(~bad, msg)
    elif bool(bad):
        raise ValueError(msg)


def check_dense_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"weighted_asl: targets must be a tensor or SparseTargets, got {type(targets).__name__}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"weighted_asl: dense targets shape {tuple(targets.shape)} != logits shape {tuple(logits.shape)}"
        )
    if targets.device != logits.device:
        raise ValueError("weighted_asl: targets must be on the logits' device")


def densify(targets: SparseTargets, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, C] dense targets; duplicates of a class in one row keep the larger confidence."""
    idx, val = targets.indices, targets.values
    valid = idx >= 0
    dense = torch.zeros(idx.shape[0], num_classes + 1, dtype=dtype, device=idx.device)
    # Padding (-1) goes to the spare last column, dropped below.
    cols = torch.where(valid, idx.long(), torch.full_like(idx.long(), num_classes))
    dense.scatter_reduce_(1, cols, val.to(dtype), reduce="amax", include_self=True)
    return dense[:, :num_classes]


def weighted_asl_reference(
    logits: torch.Tensor,
    targets: Targets,
    eta: float = 10.0,
    gamma_pos: float = 4.0,
    gamma_neg: float = 1.0,
    clip: float = 0.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Sum-reduced weighted ASL, fp32 (or float64) PyTorch; differentiable by autograd."""
    check_logits(logits)
    dtype = compute_dtype(logits.dtype)
    z = logits.to(dtype)
    if isinstance(targets, SparseTargets):
        check_sparse_targets(logits, targets)
        y = densify(targets, logits.shape[1], dtype)
    else:
        check_dense_targets(logits, targets)
        y = targets.to(dtype)

    # -log p = softplus(-z), -log(1-p) = softplus(z): finite for any finite z.
    neg_log_p = F.softplus(-z)
    neg_log_q = F.softplus(z)
    # (1-p)^gamma = exp(-gamma * softplus(z)): smooth in z, also at gamma = 0.
    pos = y * eta * torch.exp(-gamma_pos * neg_log_q) * neg_log_p
    if clip > 0:
        p = torch.sigmoid(z)
        p_m = (p - clip).clamp(min=0)
        # 1 - p_m = min(1 - p + clip, 1), with 1 - p = sigmoid(-z) exact for large z.
        one_minus_pm = (torch.sigmoid(-z) + clip).clamp(max=1)
        neg = -(1 - y) * p_m.pow(gamma_neg) * torch.log(one_minus_pm.clamp(min=eps))
    else:
        neg = (1 - y) * torch.exp(-gamma_neg * neg_log_p) * neg_log_q
    return (pos + neg).sum()
