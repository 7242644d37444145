"""Log-domain Sinkhorn reference: marginals, SwAV equivalence and overflow, clamping, 2 gloo ranks."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from hvpmtl.losses.sinkhorn import sinkhorn_reference, swav_sinkhorn


def cosine_scores(b, k, dtype=torch.float32, dim=16, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = F.normalize(torch.randn(b, dim, generator=gen), dim=1)
    p = F.normalize(torch.randn(k, dim, generator=gen), dim=1)
    return (x @ p.t()).to(dtype)


def naive_float64(scores, epsilon, n_iters, t_max):
    """Exp-domain Sinkhorn on the clamped logits, float64, [B, K] layout."""
    L = scores.double() / epsilon
    if t_max is not None:
        L = L.clamp(max=t_max)
    P = torch.exp(L)
    b, k = P.shape
    for _ in range(n_iters):
        P = P / P.sum(0, keepdim=True) / k
        P = P / P.sum(1, keepdim=True) / b
    return P * b


@pytest.mark.parametrize("t_max", [10.0, 5.0, None])
@pytest.mark.parametrize("n_iters", [1, 3])
def test_reference_matches_naive_float64(t_max, n_iters):
    s = cosine_scores(12, 30, torch.float64)
    out = sinkhorn_reference(s, n_iters=n_iters, t_max=t_max)
    torch.testing.assert_close(out, naive_float64(s, 0.05, n_iters, t_max), rtol=1e-10, atol=1e-12)


def test_rows_sum_to_one_and_columns_approach_b_over_k():
    b, k = 40, 25
    s = cosine_scores(b, k, seed=0)
    out = sinkhorn_reference(s)
    assert out.dtype == torch.float32 and out.shape == (b, k) and not out.requires_grad
    torch.testing.assert_close(out.sum(1), torch.ones(b), rtol=0, atol=1e-6)  # exact after the last row step
    assert out.sum().item() == pytest.approx(b, rel=1e-6)
    # Columns sum to B/K only after a column step; the final row step moves them, less and less.
    s64 = s.double()
    errs = [(sinkhorn_reference(s64, n_iters=n).sum(0) - b / k).abs().max().item() for n in (1, 3, 10, 30, 200)]
    assert all(a > c for a, c in zip(errs, errs[1:])) and errs[0] > 0.1 and errs[-1] < 1e-9


def test_hand_derived_two_by_two_with_clamp():
    # L = scores / 0.05 = [[20, 0], [0, 0]], clamped to a = 10. One iteration, in the exp domain:
    # column step -> [[e^a / (e^a + 1) / 2, 1/4], [1 / (e^a + 1) / 2, 1/4]], then each row normalised to 1.
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]])

    def expected(a):
        x, w = math.exp(a) / (math.exp(a) + 1) / 2, 1 / (math.exp(a) + 1) / 2
        return torch.tensor([[x / (x + 0.25), 0.25 / (x + 0.25)], [w / (w + 0.25), 0.25 / (w + 0.25)]])

    torch.testing.assert_close(sinkhorn_reference(s, n_iters=1, t_max=10.0), expected(10.0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sinkhorn_reference(s, n_iters=1, t_max=None), expected(20.0), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(expected(10.0), expected(20.0), atol=1e-6)


def test_equals_swav_when_unclamped_and_finite():
    s = cosine_scores(64, 100)
    ours, swav = sinkhorn_reference(s, t_max=None), swav_sinkhorn(s)
    assert torch.isfinite(swav).all()
    torch.testing.assert_close(ours, swav, rtol=1e-5, atol=1e-5)


def test_large_fp16_scores_overflow_swav_but_not_ours():
    s = (cosine_scores(32, 50) * 1e3).to(torch.float16)
    assert not torch.isfinite(swav_sinkhorn(s)).all()
    for t_max in (10.0, None):
        out = sinkhorn_reference(s, t_max=t_max)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.sum(1), torch.ones(32), rtol=0, atol=1e-5)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_reference(torch.randn(3, 4), n_iters=0)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_reference(torch.randn(3, 4), epsilon=0.0)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        sinkhorn_reference(torch.randn(3, 4, 5))


# ------------------------------------------------------------------------------ two gloo ranks
SPLITS = {"even": (4, 4), "uneven": (5, 3), "one-empty": (8, 0)}


def _dist_worker(rank, world, init_file, scores, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module's @triton.jit decorators run
    import torch.distributed as dist

    from hvpmtl.kernels.sinkhorn import INTERPRETED, sinkhorn

    assert INTERPRETED
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, sizes in SPLITS.items():
        start = sum(sizes[:rank])
        part = scores[start : start + sizes[rank]]
        results[name] = {
            "reference": sinkhorn_reference(part),
            "reference_unclamped": sinkhorn_reference(part, t_max=None, n_iters=4),
            "kernel": sinkhorn(part),
        }
        if min(sizes) > 0:
            results[name]["swav"] = swav_sinkhorn(part)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_gloo_ranks_equal_the_joined_batch(tmp_path):
    scores = cosine_scores(8, 40, seed=1)
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), scores, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = {
        "reference": sinkhorn_reference(scores),
        "reference_unclamped": sinkhorn_reference(scores, t_max=None, n_iters=4),
        "kernel": sinkhorn_reference(scores),  # the kernel must match the reference on the joined batch
        "swav": swav_sinkhorn(scores),
    }
    for name, sizes in SPLITS.items():
        for key, expected in single.items():
            if key == "swav" and min(sizes) == 0:
                continue
            joined = torch.cat([ranks[r][name][key] for r in range(2)])
            assert joined.shape == expected.shape, (name, key)
            torch.testing.assert_close(joined, expected, rtol=0, atol=1e-6, msg=f"{name} {key}")
