"""Triton log-domain Sinkhorn (interpreted on CPU) vs the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from hvpmtl.losses.sinkhorn import sinkhorn_reference, swav_sinkhorn


def cosine_scores(b, k, dtype=torch.float32, dim=16):
    x = F.normalize(torch.randn(b, dim), dim=1)
    p = F.normalize(torch.randn(k, dim), dim=1)
    return (x @ p.t()).to(dtype)


# Interpreter tiles: 16 x 64 column tiles, 8 x 128 row tiles; these shapes are ragged against both,
# span several column blocks and row splits, and (64, 300) loops over 3 row chunks.
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (37, 129), (64, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t_max", [10.0, None])
def test_kernel_matches_float64_reference(sinkhorn_kernel, shape, dtype, t_max):
    s = cosine_scores(*shape, dtype)
    q = sinkhorn_kernel.sinkhorn(s, t_max=t_max)
    ref = sinkhorn_reference(s.double(), t_max=t_max)
    assert q.dtype == torch.float32 and q.shape == shape
    torch.testing.assert_close(q.double(), ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(q.sum(1), torch.ones(shape[0]), rtol=0, atol=2e-6)


@pytest.mark.parametrize("n_iters", [1, 5])
def test_kernel_iterations_and_epsilon(sinkhorn_kernel, n_iters):
    s = cosine_scores(20, 70)
    q = sinkhorn_kernel.sinkhorn(s, epsilon=0.1, n_iters=n_iters, t_max=3.0)
    ref = sinkhorn_reference(s.double(), epsilon=0.1, n_iters=n_iters, t_max=3.0)
    torch.testing.assert_close(q.double(), ref, rtol=1e-5, atol=2e-6)


def test_kernel_equals_swav_where_swav_is_finite(sinkhorn_kernel):
    s = cosine_scores(24, 50)
    torch.testing.assert_close(sinkhorn_kernel.sinkhorn(s, t_max=None), swav_sinkhorn(s), rtol=1e-5, atol=1e-5)


def test_kernel_large_fp16_scores_stay_finite(sinkhorn_kernel):
    s = (cosine_scores(16, 40) * 1e3).to(torch.float16)  # scores / eps up to 2e4: exp overflows
    assert not torch.isfinite(swav_sinkhorn(s)).all()
    q = sinkhorn_kernel.sinkhorn(s)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), sinkhorn_reference(s.double()), rtol=1e-5, atol=2e-6)


def test_kernel_float64_input_and_bad_input(sinkhorn_kernel):
    s = cosine_scores(9, 13, torch.float64)
    torch.testing.assert_close(sinkhorn_kernel.sinkhorn(s).double(), sinkhorn_reference(s), rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_kernel.sinkhorn(s, n_iters=0)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        sinkhorn_kernel.sinkhorn(s[0])
