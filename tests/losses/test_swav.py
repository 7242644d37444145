"""SwAV swapped prediction against a float64 formula; codes come from the (tested) Sinkhorn."""
import math

import torch

from hvpmtl.losses.swav import sinkhorn_codes, swapped_prediction_loss


def test_matches_float64_formula():
    g = torch.Generator().manual_seed(2)
    s1, s2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    q1, q2 = torch.rand(3, 5, generator=g), torch.rand(3, 5, generator=g)
    q1, q2 = q1 / q1.sum(1, keepdim=True), q2 / q2.sum(1, keepdim=True)
    t = 0.1

    def ce(q, s):
        out = 0.0
        for b in range(3):
            lse = math.log(sum(math.exp(v / t) for v in s[b].tolist()))
            out += -sum(qq * (v / t - lse) for qq, v in zip(q[b].tolist(), s[b].tolist()))
        return out / 3

    expected = (ce(q2, s1) + ce(q1, s2)) / 2
    assert abs(swapped_prediction_loss(s1, s2, q1, q2, t).item() - expected) < 1e-4


def test_codes_carry_no_gradient_and_loss_is_minimal_at_the_codes():
    s1 = torch.randn(4, 6, requires_grad=True)
    s2 = torch.randn(4, 6)
    q = sinkhorn_codes(s2.detach(), 0.05, 3, 10.0)
    assert not q.requires_grad
    assert torch.allclose(q.sum(1), torch.ones(4), atol=1e-5)
    # cross-entropy against fixed codes is minimised when softmax(s1/t) equals them
    t = 0.1
    best = swapped_prediction_loss(t * q.clamp_min(1e-12).log(), t * q.clamp_min(1e-12).log(), q, q, t)
    worse = swapped_prediction_loss(s1, s1.detach(), q, q, t)
    assert best.item() < worse.item()
    worse.backward()
    assert s1.grad is not None and torch.isfinite(s1.grad).all()
