"""Momentum distillation: symmetric KL between student and teacher label-similarity distributions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hvpmtl.losses import fp32


def symmetric_kl_loss(student_sim: torch.Tensor, teacher_sim: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """mean_b [ KL(p_t || p_s) + KL(p_s || p_t) ], p = softmax(S / temperature) over classes, in fp32.

    S are cosine similarities [B, C] between the image embedding and the label embeddings;
    the teacher side carries no gradient.
    """
    log_ps = F.log_softmax(fp32(student_sim) / temperature, dim=1)
    log_pt = F.log_softmax(fp32(teacher_sim.detach()) / temperature, dim=1)
    kl_ts = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    kl_st = (log_ps.exp() * (log_ps - log_pt)).sum(dim=1)
    return (kl_ts + kl_st).mean()
