"""Triton weighted ASL (interpreted on CPU) vs the reference, float64 autograd and finite differences."""
import pytest
import torch

from hvpmtl.losses.asl import WeightedASLLoss
from hvpmtl.losses.weighted_asl import SparseTargets, densify, weighted_asl_reference

PAPER = dict(eta=10.0, gamma_pos=4.0, gamma_neg=1.0, clip=0.0)
ASL = dict(eta=1.0, gamma_pos=0.0, gamma_neg=4.0, clip=0.05)
# The kernel's gradient is rounded to the logits' dtype twice (saved in forward, scaled in backward);
# the interpreter rounds fp32 -> bf16 by truncation: allow 2 ulps.
GRAD_RTOL = {torch.float32: 2e-6, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}


def random_case(b, c, dtype, n_pos=6, gen=None):
    """Logits ~ N(-1, 3^2) in `dtype`; ragged sparse lists of soft positives (0.8 / 0.9 / 1.0)."""
    z = (torch.randn(b, c, generator=gen) * 3 - 1).to(dtype)
    n_pos = min(n_pos, c)
    idx = torch.rand(b, c, generator=gen).argsort(dim=1)[:, :n_pos]
    idx[torch.rand(b, n_pos, generator=gen) < 0.3] = -1
    val = torch.tensor([0.8, 0.9, 1.0])[torch.randint(0, 3, (b, n_pos), generator=gen)]
    sparse = SparseTargets(idx, val)
    return z, sparse, densify(sparse, c, torch.float32)


def kernel_and_reference(fn, z, targets, params, scale=1.0):
    """(loss, dL/dz) of the kernel, and of the reference in float64 on the same (rounded) logits."""
    zk = z.clone().requires_grad_(True)
    loss = fn(zk, targets, **params)
    (loss * scale).backward()
    z64 = z.double().requires_grad_(True)
    t64 = targets if isinstance(targets, SparseTargets) else targets.double()
    ref = weighted_asl_reference(z64, t64, **params)
    (ref * scale).backward()
    return loss, zk.grad, ref, z64.grad


def assert_close_to_reference(loss, grad, ref, grad_ref, dtype):
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-6, atol=1e-6)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    err = (grad.double() - grad_ref).abs()
    tol = GRAD_RTOL[dtype] * grad_ref.abs() + 1e-6 * grad_ref.abs().max() + 1e-7
    assert (err <= tol).all(), f"max grad error {err.max().item():.3e}"


@pytest.mark.parametrize("shape", [(1, 1), (3, 1000), (5, 1025), (2, 11166)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("params", [PAPER, ASL], ids=["paper", "asl-clip"])
def test_kernel_matches_reference(asl_kernel, shape, dtype, kind, params):
    z, sparse, dense = random_case(*shape, dtype)
    targets = sparse if kind == "sparse" else dense.to(dtype)
    scale = float(torch.rand(()) * 3 + 0.5)  # grad_output != 1
    assert_close_to_reference(*kernel_and_reference(asl_kernel.weighted_asl, z, targets, params, scale), dtype)


@pytest.mark.parametrize(
    "params",
    [PAPER, ASL, dict(eta=3.0, gamma_pos=2.5, gamma_neg=0.5, clip=0.1), dict(eta=1.0, gamma_pos=0.0, gamma_neg=0.0)],
)
def test_kernel_gradient_matches_finite_differences(asl_kernel, params):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    z, _, y = random_case(3, 7, torch.float32, n_pos=3, gen=gen)
    y[0, 0] = 0.5  # a soft target in between
    if params.get("clip", 0) > 0:  # stay away from the clip kink p = clip, where the derivative jumps
        p = torch.sigmoid(z)
        z = torch.where((p - params["clip"]).abs() < 1e-2, z + 0.5, z)
    zk = z.clone().requires_grad_(True)
    asl_kernel.weighted_asl(zk, y, **params).backward()

    z64, y64, h = z.double(), y.double(), 1e-6
    fd = torch.zeros_like(z64)
    for i in range(z64.numel()):
        e = torch.zeros_like(z64).view(-1)
        e[i] = h
        e = e.view_as(z64)
        fd.view(-1)[i] = (
            weighted_asl_reference(z64 + e, y64, **params) - weighted_asl_reference(z64 - e, y64, **params)
        ) / (2 * h)
    torch.testing.assert_close(zk.grad.double(), fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params", [PAPER, ASL], ids=["paper", "asl-clip"])
def test_kernel_finite_at_huge_logits(asl_kernel, dtype, params):
    z = torch.tensor([[1e4, -1e4, 1e4, -1e4, 0.0], [-1e4, 1e4, 30.0, -30.0, 1e4]]).to(dtype)
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.8], [0.0, 0.9, 1.0, 1.0, 0.0]]).to(dtype)
    loss, grad, ref, grad_ref = kernel_and_reference(asl_kernel.weighted_asl, z, y, params)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close_to_reference(loss, grad, ref, grad_ref, dtype)


@pytest.mark.parametrize("length", [5, 70])  # in-kernel [L, L] de-duplication, and PyTorch's for L > 64
def test_kernel_sparse_duplicates_take_the_larger_value(asl_kernel, length):
    b, c = 4, 90
    idx = torch.randint(0, 12, (b, length))  # many repeats of few classes
    idx[:, -1] = -1
    val = torch.rand(b, length)
    targets = SparseTargets(idx, val)
    dense = densify(targets, c, torch.float64)
    assert dense[0, idx[0, 0]] == val[0][idx[0] == idx[0, 0]].max()
    z = torch.randn(b, c)
    loss, grad, ref, grad_ref = kernel_and_reference(asl_kernel.weighted_asl, z, targets, PAPER)
    assert_close_to_reference(loss, grad, ref, grad_ref, torch.float32)
    _, _, ref_dense, _ = kernel_and_reference(asl_kernel.weighted_asl, z, dense, PAPER)
    torch.testing.assert_close(loss.double(), ref_dense.detach(), rtol=2e-6, atol=1e-6)


def test_kernel_dense_target_dtypes(asl_kernel):
    z, _, y = random_case(3, 50, torch.float32)
    hard = y > 0
    expected = weighted_asl_reference(z, hard.float())
    for t in (hard, hard.to(torch.uint8), hard.to(torch.bfloat16), hard.double()):
        torch.testing.assert_close(asl_kernel.weighted_asl(z, t), expected, rtol=2e-6, atol=1e-6)


def test_kernel_without_grad_and_empty(asl_kernel):
    z, sparse, y = random_case(4, 33, torch.float16)
    with torch.no_grad():
        loss = asl_kernel.weighted_asl(z.requires_grad_(True), sparse)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, weighted_asl_reference(z.detach(), y), rtol=2e-6, atol=1e-6)
    empty = torch.zeros(0, 10, requires_grad=True)
    out = asl_kernel.weighted_asl(empty, torch.zeros(0, 10))
    out.backward()
    assert out.item() == 0.0 and empty.grad.shape == (0, 10)


def test_kernel_rejects_bad_targets(asl_kernel):
    z = torch.randn(2, 5)
    with pytest.raises(ValueError, match="shape"):
        asl_kernel.weighted_asl(z, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="indices must lie"):
        asl_kernel.weighted_asl(z, SparseTargets(torch.tensor([[0, 5], [1, -1]]), torch.ones(2, 2)))
    with pytest.raises(ValueError, match="detach"):
        asl_kernel.weighted_asl(z, torch.rand(2, 5, requires_grad=True))


def test_module_dispatches_to_the_kernel_when_interpreting(asl_kernel):
    z, sparse, y = random_case(3, 40, torch.float32)
    module = WeightedASLLoss(eta=2.0, gamma_pos=1.0, gamma_neg=3.0, clip=0.05)
    zk = z.clone().requires_grad_(True)
    loss = module(zk, sparse)
    assert type(loss.grad_fn).__name__ == "_WeightedASLBackward"  # the Triton autograd.Function
    loss.backward()
    zr = z.clone().requires_grad_(True)
    ref = weighted_asl_reference(zr, y, eta=2.0, gamma_pos=1.0, gamma_neg=3.0, clip=0.05)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(zk.grad, zr.grad, rtol=1e-5, atol=1e-6)


def test_dedupe_sparse_keeps_one_max_entry_per_class(asl_kernel):
    idx = torch.tensor([[3, 1, 3, -1, 1, 3], [-1, -1, 2, 2, 0, -1]])
    val = torch.tensor([[0.2, 0.9, 0.7, 0.0, 0.8, 0.7], [0.0, 0.0, 0.5, 0.5, 1.0, 0.0]])
    i, v = asl_kernel.dedupe_sparse(idx, val)
    pairs = [sorted((int(a), round(float(b), 4)) for a, b in zip(ri, rv) if a >= 0) for ri, rv in zip(i, v)]
    assert pairs == [[(1, 0.9), (3, 0.7)], [(0, 1.0), (2, 0.5)]]
