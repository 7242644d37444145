"""benchmarks/flops.py counts what the step computes: ViT features against the analytic count (ViT-B at 224 px
and ViT-Tiny, forward and backward), each option's cost against its own formula (SwAV's unmasked view 1 = one
more backbone forward and backward; the label decoder with one query per class or ML-Decoder groups), and the
whole count against FlopCounterMode around the engine's real ZeRO-2 step."""
import sys
from pathlib import Path

import pytest
import timm
import torch

from hvpmtl.config import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import flops  # noqa: E402

pytestmark = pytest.mark.slow  # real ZeRO-2 steps and full-size models counted (tens of seconds)

TINY = ROOT / "configs/test_tiny.yaml"


def vit_features_fwd(depth, dim, img, patch, mlp_ratio=4):
    """Per image, 2 FLOPs per multiply-add: patch embedding conv, then per block on N = grid + 1 tokens
    qkv 2N.D.3D, scores 2N.N.D, weighted sum 2N.N.D, projection 2N.D.D, MLP 2N.D.rD twice."""
    grid = (img // patch) ** 2
    n = grid + 1
    embed = 2 * grid * 3 * patch * patch * dim
    per_block = (2 * n * dim * 3 * dim + 2 * n * n * dim + 2 * n * n * dim + 2 * n * dim * dim
                 + 2 * 2 * n * dim * mlp_ratio * dim)
    return embed, embed + depth * per_block


def vit_features_bwd(depth, dim, img, patch, mlp_ratio=4):
    """Backward: every matmul twice (input and weight gradient), attention twice its forward; the patch embedding
    once (the image needs no gradient)."""
    embed, fwd = vit_features_fwd(depth, dim, img, patch, mlp_ratio)
    return 2 * (fwd - embed) + embed


def decoder_fwd(batch, classes, groups, d0, dim, ffn, layers, hw):
    """The label decoder's forward for `batch` images (hvpmtl/models/label_decoder.py): input projection; the
    first layer's queries are projected once for the batch (shared), later layers' per image; K and V of the
    memory, scores and weighted sum over hw tokens, output projection, FFN; group logits by one batched matmul
    (one query per class: an elementwise product, no matmul)."""
    q = groups or classes
    f = batch * 2 * hw * d0 * dim
    for i in range(layers):
        f += 2 * q * dim * dim * (1 if i == 0 else batch)
        f += batch * (2 * 2 * hw * dim * dim + 4 * q * hw * dim + 2 * q * dim * dim + 2 * 2 * q * dim * ffn)
    if groups:
        f += batch * 2 * groups * -(-classes // groups) * dim
    return f


def test_vit_b_features_at_224_match_the_analytic_count():
    m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    with torch.no_grad(), flops.flop_counter() as c:
        m.forward_features(torch.zeros(1, 3, 224, 224))
    _, expected = vit_features_fwd(12, 768, 224, 16)
    assert expected == pytest.approx(35.15e9, rel=0.01)  # 17.6 GMACs, ViT-B/16's published cost
    assert c.get_total_flops() == pytest.approx(expected, rel=0.01)
    # the script's own formula (its check row) agrees with this one
    assert flops.vit_forward_flops(12, 768, 224, 16) == expected


def test_cpu_attention_is_counted_forward_and_backward():
    """Without perf.cpu_attention_formulas the CPU's attention kernel counts 0: ViT-B would lose ~4%."""
    from torch.utils.flop_counter import FlopCounterMode
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    with flops.flop_counter() as c:
        y = m.forward_features(x)
    fwd = c.get_total_flops()
    with flops.flop_counter() as c:
        y.sum().backward()
    bwd = c.get_total_flops()
    assert fwd == pytest.approx(2 * vit_features_fwd(12, 192, 64, 16)[1], rel=0.005)
    assert bwd == pytest.approx(2 * vit_features_bwd(12, 192, 64, 16), rel=0.005)
    with FlopCounterMode(display=False) as plain:
        m.forward_features(x)
    assert plain.get_total_flops() < fwd  # the gap the custom formulas close


@pytest.fixture(scope="module")
def tiny_counts():
    cfg = lambda *sets: load_config(TINY, ["data.num_classes=40", *sets])  # noqa: E731
    return {"masked": flops.count_step(cfg("objectives.swav.view1=masked"), batch=2),
            "unmasked": flops.count_step(cfg("objectives.swav.view1=unmasked"), batch=2),
            "groups": flops.count_step(cfg("model.decoder_groups=8"), batch=2),
            "cfg": cfg()}


def test_unmasked_view1_costs_one_backbone_forward_and_backward(tiny_counts):
    cfg = tiny_counts["cfg"]
    embed, fwd = vit_features_fwd(12, 192, cfg.model.img_size, 16)
    bwd = vit_features_bwd(12, 192, cfg.model.img_size, 16)
    m, u = tiny_counts["masked"], tiny_counts["unmasked"]
    assert u["total"] - m["total"] == pytest.approx(fwd + bwd, rel=0.01)
    assert u["teacher_fwd"] == m["teacher_fwd"]
    # the student's backbone: 2 forwards (masked view 1, view 2), 3 when unmasked; the teacher's one more
    assert m["student_fwd_parts"]["backbone"] == pytest.approx(2 * fwd, rel=0.01)
    assert u["student_fwd_parts"]["backbone"] == pytest.approx(3 * fwd, rel=0.01)
    assert u["saved_mib_per_image"] > m["saved_mib_per_image"] > 0
    assert m["view1"] == "masked" and u["view1"] == "unmasked"


def test_label_decoder_per_class_and_groups_match_their_formula(tiny_counts):
    m = tiny_counts["cfg"].model
    hw = (m.img_size // 16) ** 2
    args = dict(d0=192, dim=m.decoder_dim, ffn=m.decoder_ffn_dim, layers=m.decoder_layers, hw=hw)
    for key, groups in (("masked", 0), ("groups", 8)):
        r = tiny_counts[key]
        # the student decodes both views: two calls of batch 2, per image
        expected = 2 * decoder_fwd(2, 40, groups, **args) / 2
        assert r["student_fwd_parts"]["label_decoder"] == pytest.approx(expected, rel=0.005), key
    assert tiny_counts["groups"]["decoder"] == "1 layers, 8 groups"
    assert tiny_counts["masked"]["decoder"] == "1 layers, per class"


def test_fake_tensors_count_what_the_computed_step_counts():
    """The script counts on fake tensors (no arithmetic); the computed step gives the same FLOPs and the same
    activation bytes (to the few hundred bytes the Triton losses, interpreted here, keep unlike the torch ones)."""
    cfg = load_config(TINY, ["objectives.swav.view1=unmasked", "model.decoder_groups=4"])
    fake, real = flops.count_step(cfg, batch=2, fake=True), flops.count_step(cfg, batch=2, fake=False)
    for k in ("teacher_fwd", "student_fwd", "student_bwd", "total", "student_fwd_parts"):
        assert fake[k] == real[k], k
    assert fake["saved_mib_per_image"] == pytest.approx(real["saved_mib_per_image"], rel=1e-3)
    # parameters are not activations: a ViT-Tiny's weights alone are 22 MiB
    assert 1 < real["saved_mib_per_image"] < 20


def test_count_equals_the_engines_real_zero2_step(tmp_path):
    """FlopCounterMode around Pretrainer's own step (teacher, DeepSpeed ZeRO-2 forward/backward/step, EMA update)
    counts what count_step counts: nothing of the engine is missed or added."""
    from hvpmtl.train.pretrain import Pretrainer
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", "tracking.enabled=false",
                             "optim.micro_batch_size=2", "objectives.swav.view1=unmasked"])
    t = Pretrainer(cfg, resume="none")
    try:
        batch = next(iter(t.loader))
        with flops.flop_counter() as c:
            assert not t.meta.forward_backward(batch, step=0).nonfinite
            t.meta.update_teacher(0.995)
        real = c.get_total_flops() / 2
    finally:
        t.tracker.close()
    counted = flops.count_step(load_config(TINY, ["objectives.swav.view1=unmasked"]), batch=2)
    assert counted["total"] == pytest.approx(real, rel=1e-6)
    assert counted["total"] == pytest.approx(counted["teacher_fwd"] + counted["student_fwd"] + counted["student_bwd"])


def test_the_script_lists_every_pretraining_config_and_the_paper_options():
    paths = sorted(q for q in (ROOT / "configs").rglob("*.yaml") if flops.is_pretrain_config(q))
    names = {str(p.relative_to(ROOT)) for p in paths}
    assert {"configs/pretrain_vit_b.yaml", "configs/pretrain_swin_b.yaml", "configs/test_tiny.yaml"} <= names
    assert "configs/finetune_simmim.yaml" not in names  # another schema, another step
    rows = flops.variants(paths, options=True)
    vit = [(o, s) for c, o, s in rows if c == "configs/pretrain_vit_b.yaml"]
    assert ("view1 masked", ["objectives.swav.view1=masked"]) in vit
    assert ("128 decoder groups (ML-Decoder)", ["model.decoder_groups=128"]) in vit
    assert any("data.num_classes=1000" in s for _, s in vit)
