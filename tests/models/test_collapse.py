"""Collapse statistics against float64 hand-derived values, their reduction over ranks, the monitor, and a
head forced into the collapsed state."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from hvpmtl.config import load_config
from hvpmtl.losses.swav import sinkhorn_codes
from hvpmtl.dist import sum_to_host
from hvpmtl.models.collapse import (CollapseMonitor, collapse_figures, distill_sums, entropy_of_logits,
                                    entropy_of_probs, swav_sums)
from hvpmtl.models.meta_arch import Student, Teacher

D = torch.float64


def _h(p):  # entropy by hand, 0 log 0 = 0
    return -sum(x * math.log(x) for x in p if x > 0)


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [x / sum(e) for x in e]


def test_normalised_entropy_of_probabilities():
    p = torch.tensor([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.7, 0.2, 0.1, 0.0]], dtype=D)
    got = entropy_of_probs(p)
    assert got.dtype == D
    expected = [1.0, 0.0, 0.5, _h([0.7, 0.2, 0.1]) / math.log(4)]
    for g, e in zip(got.tolist(), expected):
        assert abs(g - e) < 1e-12
    with pytest.raises(ValueError, match="at least 2 classes"):
        entropy_of_probs(torch.ones(3, 1, dtype=D))


def test_normalised_entropy_of_logits():
    rows = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.3, -0.2, 0.9]]
    got = entropy_of_logits(torch.tensor(rows, dtype=D), 0.5).tolist()
    for g, row in zip(got, rows):
        assert abs(g - _h(_softmax(row, 0.5)) / math.log(3)) < 1e-12
    assert abs(got[1] - 1.0) < 1e-15


def _hand_case():
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.3, 0.8], [0.7, 0.6, -0.5], [0.5, 0.1, 0.4]], dtype=D)
    codes = torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.0, 0.5]], dtype=D)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=D)
    return scores, codes, z


def test_swav_figures_hand_derived():
    scores, codes, z = _hand_case()
    f = collapse_figures(swav_sums(scores, codes, z, 0.1))
    assert abs(f["swav/code_entropy"] - sum(_h(r) for r in codes.tolist()) / (4 * math.log(3))) < 1e-12
    pred = sum(_h(_softmax(r, 0.1)) for r in scores.tolist()) / (4 * math.log(3))
    assert abs(f["swav/pred_entropy"] - pred) < 1e-12
    assert f["swav/protos_used"] == 2  # argmaxes 0, 2, 0, 0
    # population std per dimension: dim 0 of (1, 0, 1, .6), dim 1 of (0, 1, 0, .8)
    xs, ys = [1, 0, 1, .6], [0, 1, 0, .8]
    mx, my = sum(xs) / 4, sum(ys) / 4
    a = sum((x - mx) ** 2 for x in xs) / 4
    c = sum((y - my) ** 2 for y in ys) / 4
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / 4
    assert abs(f["swav/z_std"] - (math.sqrt(a) + math.sqrt(c)) / 2) < 1e-12
    # eigenvalues of the 2x2 covariance [[a, b], [b, c]], then exp of the entropy of their shares
    root = math.sqrt(((a - c) / 2) ** 2 + b * b)
    lam = [(a + c) / 2 + root, (a + c) / 2 - root]
    assert abs(f["swav/z_rank"] - math.exp(_h([v / sum(lam) for v in lam]))) < 1e-12


@pytest.mark.parametrize("case,rank,std_sqrt_d", [
    ("identical", 0.0, 0.0),  # every z the same
    ("line", 1.0, None),  # z = +v or -v: z_std looks healthy, the rank does not
    ("isotropic", 8.0, 1.0),  # z = +-e_i for every i: covariance I / d
])
def test_embedding_figures_of_known_geometries(case, rank, std_sqrt_d):
    d = 8
    v = torch.nn.functional.normalize(torch.arange(1.0, d + 1, dtype=D), dim=0)
    z = {"identical": v.repeat(6, 1), "line": torch.stack([v, -v, v, -v]),
         "isotropic": torch.cat([torch.eye(d, dtype=D), -torch.eye(d, dtype=D)])}[case]
    scores = z @ torch.eye(d, 3, dtype=D)
    f = collapse_figures(swav_sums(scores, torch.full_like(scores, 1 / 3), z, 0.1))
    assert abs(f["swav/z_rank"] - rank) < 1e-9
    if std_sqrt_d is not None:
        assert abs(f["swav/z_std"] * math.sqrt(d) - std_sqrt_d) < 1e-8  # sqrt of a ~1e-18 residual
    else:  # the line: per-dimension std |v_i|, mean of |v| ~ 0.8 / sqrt(d) here
        assert abs(f["swav/z_std"] - v.abs().mean().item()) < 1e-12


def test_distill_figures_hand_derived():
    s = torch.tensor([[0.2, 0.9, -0.1], [0.0, 0.0, 0.0]], dtype=D)
    t = torch.tensor([[0.5, 0.5, 0.4], [1.0, -1.0, 0.0]], dtype=D)
    f = collapse_figures(distill_sums(s, t, 0.1))
    assert abs(f["distill/student_entropy"] - sum(_h(_softmax(r, .1)) for r in s.tolist()) / (2 * math.log(3))) < 1e-12
    assert abs(f["distill/teacher_entropy"] - sum(_h(_softmax(r, .1)) for r in t.tolist()) / (2 * math.log(3))) < 1e-12


def _random_case(n=10, k=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=D), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=D), dim=1).t()
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=D), dim=1)
    return scores, sinkhorn_codes(scores), z


def test_sums_of_parts_give_the_figures_of_the_whole():
    """What the step's one SUM all-reduce (over ranks) and the trainer's sum over micro-batches rely on."""
    scores, codes, z = _random_case()
    whole = collapse_figures(swav_sums(scores, codes, z, 0.1) | distill_sums(scores, z @ z.t()[:, :7], 0.1))
    acc = {}
    for part in (slice(0, 6), slice(6, 9), slice(9, 10)):
        new = swav_sums(scores[part], codes[part], z[part], 0.1) | distill_sums(scores[part], (z @ z.t()[:, :7])[part], 0.1)
        acc = {k: acc[k] + v if k in acc else v for k, v in new.items()}
    parts = collapse_figures(acc)
    assert set(parts) == set(whole)
    for k in whole:
        assert abs(parts[k] - whole[k]) < 1e-12, k


def _reduce_worker(rank, world, init_file, scores, codes, z, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    part = slice(0, 7) if rank == 0 else slice(7, 10)  # unequal local batches
    sums = swav_sums(scores[part], codes[part], z[part], 0.1)
    keys = sorted(sums)  # packed as HVPMetaArch._reduce packs them: one flat float64 tensor, one SUM
    host = sum_to_host(torch.cat([sums[k].double().reshape(-1) for k in keys]))
    reduced, i = {}, 0
    for k in keys:
        reduced[k] = torch.tensor(host[i:i + sums[k].numel()], dtype=D).reshape(sums[k].shape)
        i += sums[k].numel()
    dist.barrier()
    dist.destroy_process_group()
    torch.save(collapse_figures(reduced), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_gloo_ranks_reduce_to_the_global_figures(tmp_path):
    scores, codes, z = _random_case()
    mp.spawn(_reduce_worker, args=(2, str(tmp_path / "init"), scores, codes, z, str(tmp_path)), nprocs=2, join=True)
    whole = collapse_figures(swav_sums(scores, codes, z, 0.1))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for k in whole:
            assert abs(got[k] - whole[k]) < 1e-12, (r, k)


HEALTHY = {"swav/code_entropy": 0.7, "swav/pred_entropy": 0.8, "swav/protos_used": 12.0, "swav/z_std": 0.12,
           "swav/z_rank": 20.0,
           "distill/student_entropy": 0.9, "distill/teacher_entropy": 0.9}


def test_monitor_warns_once_after_patience_and_when_it_is_over():
    mon = CollapseMonitor(patience=3, embed_dim=64)
    collapsed = dict(HEALTHY, **{"swav/code_entropy": 0.995})
    assert mon.update(HEALTHY, 1) == []
    assert mon.update(collapsed, 2) == [] and mon.update(collapsed, 3) == []
    msgs = mon.update(collapsed, 4)
    assert len(msgs) == 1 and "swav/code_entropy" in msgs[0] and "for 3 steps" in msgs[0]
    assert mon.update(collapsed, 5) == [] and mon.active == ["swav/code_entropy"]
    over = mon.update(HEALTHY, 6)
    assert len(over) == 1 and "over" in over[0] and mon.active == []
    # an interrupted streak starts again from zero
    mon.update(collapsed, 7), mon.update(collapsed, 8), mon.update(HEALTHY, 9), mon.update(collapsed, 10)
    assert mon.update(collapsed, 11) == []


def test_monitor_thresholds_per_figure():
    mon = CollapseMonitor(patience=1, embed_dim=64)
    assert mon.collapsed(HEALTHY) == {}
    bad = {"swav/code_entropy": 1.0, "swav/pred_entropy": 0.999, "swav/protos_used": 1.0,
           "swav/z_std": 0.01 / 8, "swav/z_rank": 1.2, "distill/student_entropy": 0.995,
           "distill/teacher_entropy": 0.2}
    assert set(mon.collapsed(bad)) == {"swav/code_entropy", "swav/pred_entropy", "swav/protos_used", "swav/z_std",
                                       "swav/z_rank", "distill/student_entropy"}
    with pytest.raises(ValueError):
        CollapseMonitor(patience=0, embed_dim=8)


def _student_figures(collapse_head: bool, norm: str):
    torch.manual_seed(0)
    cfg = load_config("configs/test_tiny.yaml", [f"model.proto_head_norm={norm}"])
    st = Student(cfg)
    te = Teacher(st)
    if collapse_head:  # the head's MLP gives the same vector for every image
        st.prototype_head.mlp.register_forward_hook(lambda mod, args, out: out * 0 + 1)
    b, s = 8, cfg.model.img_size
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(b, 3, s, s, generator=g), torch.randn(b, 3, s, s, generator=g)
    mask = torch.zeros(b, s // 16, s // 16, dtype=torch.bool)
    mask[:, ::2] = True
    y = (torch.rand(b, cfg.data.num_classes, generator=g) < 0.3).float()
    out = st(v1, v2, mask, y, teacher_sim=te(v1))
    return cfg, collapse_figures(out["sums"])


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_head_forced_into_collapse_is_reported(norm):
    cfg, fig = _student_figures(collapse_head=True, norm=norm)
    # identical embeddings: one prototype wins every view, the codes are uniform, no spread
    assert fig["swav/protos_used"] == 1 and fig["swav/z_std"] < 1e-6 and fig["swav/code_entropy"] > 0.999
    assert fig["swav/z_rank"] == 0
    mon = CollapseMonitor(patience=3, embed_dim=cfg.model.proto_out_dim)
    msgs = [m for step in (1, 2, 3) for m in mon.update(fig, step)]
    assert {"swav/code_entropy", "swav/protos_used", "swav/z_std", "swav/z_rank"} <= set(mon.active)
    assert all("step 3" in m for m in msgs) and len(msgs) == len(mon.active)

    _, healthy = _student_figures(collapse_head=False, norm=norm)
    assert healthy["swav/protos_used"] > 1 and healthy["swav/z_std"] * math.sqrt(cfg.model.proto_out_dim) > 0.3
    assert healthy["swav/z_rank"] > 2
    mon = CollapseMonitor(patience=1, embed_dim=cfg.model.proto_out_dim)
    assert not {"swav/protos_used", "swav/z_std", "swav/z_rank"} & set(mon.collapsed(healthy))
