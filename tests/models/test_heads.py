"""The SwAV head's global-statistics BatchNorm: equal to nn.BatchNorm1d on one rank, and 2 gloo ranks of a
split batch equal 1 rank of the joined batch (outputs, gradients, running statistics)."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from hvpmtl.models.heads import GlobalBatchNorm1d, PrototypeHead

D = torch.float64


def _case(n=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=D) * 3 + 1.5
    r = torch.randn(n, c, generator=g, dtype=D)  # the loss is sum(r * y): every output gets its own gradient
    weight = torch.rand(c, generator=g, dtype=D) + 0.5
    bias = torch.randn(c, generator=g, dtype=D)
    return x, r, weight, bias


def _run(bn, x, r, weight, bias, steps=2):
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    x = x.clone().requires_grad_(True)
    for _ in range(steps):  # two training steps move the running statistics twice
        y = bn(x)
    (r * y).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "tracked": bn.num_batches_tracked.clone()}


def test_one_rank_equals_torch_batchnorm_in_training_and_eval():
    x, r, w, b = _case()
    ours = _run(GlobalBatchNorm1d(5).to(D), x, r, w, b)
    ref_bn = torch.nn.BatchNorm1d(5).to(D)
    ref = _run(ref_bn, x, r, w, b)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
    bn = GlobalBatchNorm1d(5).to(D)
    bn.load_state_dict(ref_bn.state_dict())
    bn.eval(), ref_bn.eval()
    torch.testing.assert_close(bn(x), ref_bn(x))


def test_rejects_a_wrong_shape_with_a_clear_message():
    with pytest.raises(ValueError, match=r"expects \[N, 5\]"):
        GlobalBatchNorm1d(5)(torch.randn(4, 3))


SPLITS = {"even": (4, 4), "uneven": (5, 3)}


def _bn_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, r, w, b = _case()
    results = {}
    for name, sizes in SPLITS.items():
        part = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        results[name] = _run(GlobalBatchNorm1d(5).to(D), x[part], r[part], w, b)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank_of_the_joined_batch(tmp_path):
    mp.spawn(_bn_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, r, w, b = _case()
    one = _run(GlobalBatchNorm1d(5).to(D), x, r, w, b)
    local_only = _run(torch.nn.BatchNorm1d(5).to(D), x[:4], r[:4], w, b)  # what plain per-rank BN would give
    for name in SPLITS:
        got = [ranks[k][name] for k in range(2)]
        for key in ("y", "x_grad"):  # per row: the joined rows
            torch.testing.assert_close(torch.cat([g[key] for g in got]), one[key], rtol=1e-10, atol=1e-12,
                                       msg=f"{name} {key}")
        for key in ("w_grad", "b_grad"):  # parameter gradients: the sum over ranks (then DeepSpeed averages)
            torch.testing.assert_close(got[0][key] + got[1][key], one[key], rtol=1e-10, atol=1e-12,
                                       msg=f"{name} {key}")
        for key in ("running_mean", "running_var", "tracked"):  # identical on every rank
            for g in got:
                torch.testing.assert_close(g[key], one[key], rtol=1e-10, atol=1e-12, msg=f"{name} {key}")
    assert not torch.allclose(local_only["y"], one["y"][:4])  # the test can tell local from global statistics


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_prototype_head_gives_unit_embeddings_and_cosine_scores(norm):
    torch.manual_seed(0)
    head = PrototypeHead(16, 32, 8, 10, norm=norm)
    z, s = head(torch.randn(6, 2, 2, 16))
    assert z.shape == (6, 8) and s.shape == (6, 10)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(s, z @ torch.nn.functional.normalize(head.prototypes.weight, dim=1).t())
    assert isinstance(head.mlp[1], GlobalBatchNorm1d if norm == "batchnorm" else torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="norm must be one of"):
        PrototypeHead(16, 32, 8, 10, norm="groupnorm")
