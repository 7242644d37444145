"""Symmetric KL of momentum distillation against float64 formulas and finite differences."""
import math

import torch

from hvpmtl.losses.distillation import symmetric_kl_loss


def _softmax64(row, t):
    e = [math.exp(v / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


def test_matches_float64_formula():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    tau = 0.3
    total = 0.0
    for b in range(4):
        ps, pt = _softmax64(s[b].tolist(), tau), _softmax64(t[b].tolist(), tau)
        total += sum(a * math.log(a / c) for a, c in zip(pt, ps)) + sum(c * math.log(c / a) for a, c in zip(pt, ps))
    assert abs(symmetric_kl_loss(s, t, tau).item() - total / 4) < 1e-5


def test_zero_when_equal_and_two_class_hand_case():
    s = torch.randn(3, 5)
    assert symmetric_kl_loss(s, s.clone(), 0.1).abs().item() < 1e-6
    # two classes, tau = 1: p = (1/2, 1/2), q = softmax(0, ln 3) = (1/4, 3/4)
    # KL(p||q) + KL(q||p) = sum (p - q) ln(p / q) = (1/4) ln 2 + (-1/4) ln(2/3) = (1/4) ln 3
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[0.0, math.log(3)]])
    assert abs(symmetric_kl_loss(a, b, 1.0).item() - math.log(3) / 4) < 1e-6


def test_gradient_finite_differences_and_teacher_gets_none():
    s = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: symmetric_kl_loss(x, t, 0.5).double(), (s,))
    symmetric_kl_loss(s, t, 0.5).backward()
    assert t.grad is None
