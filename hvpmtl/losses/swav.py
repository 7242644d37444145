"""SwAV swapped prediction: predict one view's Sinkhorn codes from the other view's scores."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hvpmtl.losses import fp32

from hvpmtl.kernels import use_triton


def sinkhorn_codes(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3, t_max: float | None = 10.0,
                   group=None, global_batch: int | None = None) -> torch.Tensor:
    """Codes Q [B, K] (rows sum to 1) by the log-domain clamped Sinkhorn, over all ranks; `global_batch` is the
    number of rows over all ranks when the caller knows it (else it is all-reduced).

    The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the fp32 reference otherwise.
    """
    if use_triton(scores):
        from hvpmtl.kernels.sinkhorn import sinkhorn
        return sinkhorn(scores, epsilon=epsilon, n_iters=n_iters, t_max=t_max, group=group, global_batch=global_batch)
    from hvpmtl.losses.sinkhorn import sinkhorn_reference
    return sinkhorn_reference(scores, epsilon=epsilon, n_iters=n_iters, t_max=t_max, group=group,
                              global_batch=global_batch)


def swapped_prediction_loss(scores1: torch.Tensor, scores2: torch.Tensor, codes1: torch.Tensor,
                            codes2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """mean_b of -[ <q2, log softmax(s1/t)> + <q1, log softmax(s2/t)> ] / 2, in fp32.

    codes are targets (no gradient); scores are the views' prototype scores.
    """
    log_p1 = F.log_softmax(fp32(scores1) / temperature, dim=1)
    log_p2 = F.log_softmax(fp32(scores2) / temperature, dim=1)
    l12 = -(fp32(codes2.detach()) * log_p1).sum(dim=1).mean()
    l21 = -(fp32(codes1.detach()) * log_p2).sum(dim=1).mean()
    return (l12 + l21) / 2
