"""Sinkhorn-Knopp codes for SwAV: a log-domain, clamped, distributed reference and SwAV's original.

`sinkhorn_reference(scores)` works on L = min(scores / epsilon, t_max) in the log domain, so no
exp ever overflows (SwAV's exp-domain code gives inf/NaN once scores / epsilon passes ~88 in fp32,
~11 in fp16: swav#67, dinov2#583). Each iteration normalises
  (1) every prototype column over the GLOBAL batch:  L -= logsumexp_b L[:, k] + log K
  (2) every sample row:                              L -= logsumexp_k L[b, :] + log B_global
and Q = exp(L + log B_global) is returned: rows sum to 1, columns to about B_global / K
(exactly after a column step; the final row step moves them slightly). This is SwAV's (Q * B).t()
in [B, K] layout.

Across ranks (torch.distributed initialised, world size > 1) only the column logsumexp needs
the other ranks: all_reduce MAX of the column max, then all_reduce SUM of sum_b exp(L - max).
B_global is given by the caller when it knows it (the training step: local rows x world size, a static
number), else it is the all_reduced sum of the local batch sizes, so unequal batches are fine.
The Triton twin is `hvpmtl.kernels.sinkhorn.sinkhorn`, same signature.
"""
import math
from typing import Optional

import torch
import torch.distributed as dist


def distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def check_scores(scores: torch.Tensor, epsilon: float, n_iters: int) -> None:
    if scores.dim() != 2 or not torch.is_floating_point(scores):
        raise ValueError(f"sinkhorn: scores must be a float [B, K] tensor, got {scores.dtype} {tuple(scores.shape)}")
    if scores.shape[1] == 0:
        raise ValueError("sinkhorn: scores need at least one prototype column (K >= 1)")
    if n_iters < 1:
        raise ValueError(f"sinkhorn: n_iters must be >= 1, got {n_iters}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")


def global_batch_size(local: int, device: torch.device, group=None, known: Optional[int] = None) -> int:
    """Sum of the batch sizes over the ranks of `group` (just `local` outside torch.distributed); `known`, when
    the caller gives it, is taken as is: no collective, no host sync."""
    if known is not None:
        return known
    if not distributed(group):
        return local
    n = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.SUM, group=group)
    return int(n.item())


def global_column_lse(col_max: torch.Tensor, col_sum: torch.Tensor, group=None) -> torch.Tensor:
    """log sum_b exp over all ranks' rows, from local (max, sum of exp(L - max)) per column.

    A column with no local rows has max = -inf and sum = 0.
    """
    if distributed(group):
        g_max = col_max.clone()
        dist.all_reduce(g_max, op=dist.ReduceOp.MAX, group=group)
        rescale = torch.exp(torch.where(torch.isfinite(col_max), col_max - g_max, torch.full_like(col_max, -math.inf)))
        col_sum = col_sum * rescale
        dist.all_reduce(col_sum, op=dist.ReduceOp.SUM, group=group)
        col_max = g_max
    return col_max + torch.log(col_sum)


@torch.no_grad()
def sinkhorn_reference(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    n_iters: int = 3,
    t_max: Optional[float] = 10.0,
    group=None,
    global_batch: Optional[int] = None,
) -> torch.Tensor:
    """Log-domain clamped Sinkhorn: Q [B, K] fp32 (float64 for float64 scores), rows summing to 1.
    `global_batch`: rows over all ranks if known (else all-reduced)."""
    check_scores(scores, epsilon, n_iters)
    dtype = torch.promote_types(scores.dtype, torch.float32)
    L = scores.detach().to(dtype) / epsilon
    if t_max is not None:
        L = L.clamp(max=t_max)
    b_local, k = L.shape
    log_b = math.log(max(global_batch_size(b_local, L.device, group, global_batch), 1))
    log_k = math.log(k)
    for _ in range(n_iters):
        if b_local > 0:
            col_max = L.amax(dim=0)
            col_sum = torch.exp(L - col_max).sum(dim=0)
        else:
            col_max = torch.full((k,), -math.inf, dtype=dtype, device=L.device)
            col_sum = torch.zeros(k, dtype=dtype, device=L.device)
        L = L - (global_column_lse(col_max, col_sum, group) + log_k)
        L = L - (torch.logsumexp(L, dim=1, keepdim=True) + log_b)
    return torch.exp(L + log_b)


@torch.no_grad()
def swav_sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3, group=None,
                  global_batch: Optional[int] = None) -> torch.Tensor:
    """SwAV's `distributed_sinkhorn`, exp domain and in the scores' dtype (overflows for large scores / eps).

    Written from its formula: Q = exp(scores / eps).t(), divided by its global sum, then n_iters of
    prototype-row and sample-column normalisation with the global counts, returned as (Q * B).t().
    B is the all_reduced sum of local batch sizes (SwAV multiplies by the world size; equal for equal batches).
    """
    check_scores(scores, epsilon, n_iters)
    Q = torch.exp(scores.detach() / epsilon).t()  # [K, B]
    k = Q.shape[0]
    b = global_batch_size(Q.shape[1], Q.device, group, global_batch)
    sum_q = torch.sum(Q)
    if distributed(group):
        dist.all_reduce(sum_q, group=group)
    Q = Q / sum_q
    for _ in range(n_iters):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        if distributed(group):
            dist.all_reduce(sum_of_rows, group=group)
        Q = Q / sum_of_rows / k
        Q = Q / torch.sum(Q, dim=0, keepdim=True) / b
    Q = Q * b
    return Q.t()
