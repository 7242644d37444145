"""fp32 weighted ASL reference: hand-derived cases, float64 formulas, gradcheck, fp16/bf16 extremes."""
import math

import pytest
import torch

from hvpmtl.losses.weighted_asl import SparseTargets, densify, weighted_asl_reference

LN2 = math.log(2.0)


def naive_float64(z, y, eta, gamma_pos, gamma_neg, clip):
    """The loss exactly as the paper writes it, float64, no stabilisation (fine for |z| < 30)."""
    z, y = z.double(), y.double()
    p = torch.sigmoid(z)
    p_m = (p - clip).clamp(min=0) if clip > 0 else p
    return -(y * eta * (1 - p) ** gamma_pos * torch.log(p) + (1 - y) * p_m**gamma_neg * torch.log(1 - p_m)).sum()


def original_asl_float64(z, y, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8):
    """ASL's AsymmetricLossOptimized rewritten from its formula (hard targets), float64."""
    z, y = z.double(), y.double()
    xs_pos = torch.sigmoid(z)
    xs_neg = (1 - xs_pos + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    base = 1 - xs_pos * y - xs_neg * (1 - y)
    return -(loss * base.pow(gamma_pos * y + gamma_neg * (1 - y))).sum()


def test_hand_derived_values_at_z_zero():
    z = torch.zeros(1, 4)
    y = torch.tensor([[1.0, 0.0, 0.8, 0.0]])
    # p = 1/2: positive term eta * 2^-gp * ln 2, negative term 2^-gn * ln 2.
    pos, neg = 10.0 / 16 * LN2, 0.5 * LN2
    expected = pos + neg + (0.8 * pos + 0.2 * neg) + neg
    assert weighted_asl_reference(z, y).item() == pytest.approx(expected, rel=1e-6)
    # With clip 0.05: p_m = 0.45, negative term -0.45 * log(0.55).
    clipped = -0.45 * math.log(0.55)
    expected = pos + clipped + (0.8 * pos + 0.2 * clipped) + clipped
    assert weighted_asl_reference(z, y, clip=0.05).item() == pytest.approx(expected, rel=1e-6)


def test_hand_derived_gradients_at_z_zero():
    z = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    weighted_asl_reference(z[:, :2], y[:, :2]).backward()
    # y=1: d/dz = -eta (1-p)^gp [(1-p) + gp p (-log p)] = -10/16 (1/2 + 4 * 1/2 * ln 2)
    # y=0: d/dz = p^gn [p + gn (1-p) (-log(1-p))] = 1/2 (1/2 + 1/2 ln 2)
    torch.testing.assert_close(z.grad[0, :2], torch.tensor([-10 / 16 * (0.5 + 2 * LN2), 0.5 * (0.5 + 0.5 * LN2)]).double())
    z.grad = None
    weighted_asl_reference(z[:, 2:], y[:, 2:], clip=0.05).backward()
    # y=0, clip: d/dz = -p(1-p) [gn p_m^(gn-1) log(1-p_m) - p_m^gn / (1-p_m)], p_m = 0.45
    expected = -0.25 * (math.log(0.55) - 0.45 / 0.55)
    assert z.grad[0, 2].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "params",
    [
        dict(eta=10.0, gamma_pos=4.0, gamma_neg=1.0, clip=0.0),
        dict(eta=1.0, gamma_pos=0.0, gamma_neg=4.0, clip=0.05),
        dict(eta=2.5, gamma_pos=1.5, gamma_neg=0.0, clip=0.2),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_naive_float64_formula(params, dtype):
    z = (torch.randn(6, 50) * 4).clamp(-25, 25).to(dtype)
    y = torch.rand(6, 50).round() * torch.tensor([0.8, 0.9, 1.0])[torch.randint(0, 3, (6, 50))]
    out = weighted_asl_reference(z, y, **params)
    assert out.dtype == torch.promote_types(dtype, torch.float32) and out.dim() == 0
    torch.testing.assert_close(out.double(), naive_float64(z, y, **params), rtol=1e-5, atol=1e-5)


def test_original_asl_settings_match_asl_formula():
    z = torch.randn(5, 40, dtype=torch.float64) * 3
    y = (torch.rand(5, 40) < 0.2).double()
    ours = weighted_asl_reference(z, y, eta=1.0, gamma_pos=0.0, gamma_neg=4.0, clip=0.05)
    torch.testing.assert_close(ours, original_asl_float64(z, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "params",
    [
        dict(eta=10.0, gamma_pos=4.0, gamma_neg=1.0, clip=0.0),
        dict(eta=1.0, gamma_pos=0.0, gamma_neg=4.0, clip=0.05),
        dict(eta=3.0, gamma_pos=2.5, gamma_neg=1.5, clip=0.1),
    ],
)
def test_reference_gradcheck_float64(params):
    z = torch.randn(3, 8, dtype=torch.float64) * 3
    if params["clip"] > 0:  # keep off the kink at p = clip
        near = (torch.sigmoid(z) - params["clip"]).abs() < 1e-2
        z = torch.where(near, z + 0.5, z)
    z.requires_grad_(True)
    y = torch.tensor([0.0, 0.8, 0.9, 1.0], dtype=torch.float64)[torch.randint(0, 4, (3, 8))]
    assert torch.autograd.gradcheck(lambda t: weighted_asl_reference(t, y, **params), (z,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_reference_finite_at_huge_logits(dtype, clip):
    z = torch.tensor([[1e4, -1e4, 1e4, -1e4]], dtype=dtype, requires_grad=True)
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=dtype)
    loss = weighted_asl_reference(z, y, clip=clip)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # Confident right answers cost ~0; a confident wrong positive costs eta * |z|, a confident wrong
    # negative |z| (or -0.95 log 0.05 with clip 0.05: p_m = 0.95).
    a = float(z[0, 0].detach())  # 1e4 rounded to the dtype
    expected = 10.0 * a + (a if clip == 0 else -0.95 * math.log(0.05))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_sparse_targets_equal_dense_and_padding_is_ignored():
    z = torch.randn(3, 10)
    idx = torch.tensor([[2, 7, -1, -1], [-1, -1, -1, -1], [0, 9, 9, 4]])
    val = torch.tensor([[1.0, 0.8, 0.3, 0.7], [0.9, 0.9, 0.9, 0.9], [0.9, 0.8, 1.0, 1.0]])
    dense = torch.zeros(3, 10)
    dense[0, 2], dense[0, 7] = 1.0, 0.8
    dense[2, 0], dense[2, 9], dense[2, 4] = 0.9, 1.0, 1.0  # class 9 listed twice: the larger value
    torch.testing.assert_close(densify(SparseTargets(idx, val), 10, torch.float32), dense)
    torch.testing.assert_close(weighted_asl_reference(z, SparseTargets(idx, val)), weighted_asl_reference(z, dense))


def test_reference_rejects_bad_input():
    z = torch.randn(2, 5)
    with pytest.raises(ValueError, match="shape"):
        weighted_asl_reference(z, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="indices must lie"):
        weighted_asl_reference(z, SparseTargets(torch.tensor([[0, -2], [1, 2]]), torch.ones(2, 2)))
    with pytest.raises(ValueError, match="values in"):
        weighted_asl_reference(z, SparseTargets(torch.tensor([[0, 1], [1, 2]]), torch.full((2, 2), 1.5)))
    with pytest.raises(TypeError, match="integer indices"):
        weighted_asl_reference(z, SparseTargets(torch.zeros(2, 2), torch.ones(2, 2)))
    with pytest.raises(TypeError, match="float"):
        weighted_asl_reference(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5))
