"""Student objectives wiring, switched-off heads, and the EMA teacher."""
import copy

import pytest
import torch

from hvpmtl.config import load_config
from hvpmtl.models.meta_arch import Student, Teacher


def _batch(cfg, b=2):
    s = cfg.model.img_size
    g = s // 16
    mask = torch.zeros(b, g, g, dtype=torch.bool)
    mask[:, : g // 2] = True
    return torch.randn(b, 3, s, s), torch.randn(b, 3, s, s), mask, (torch.rand(b, cfg.data.num_classes) < 0.3).float()


def test_total_is_the_weighted_sum_of_the_four_objectives():
    torch.manual_seed(0)
    cfg = load_config("configs/test_tiny.yaml")
    st = Student(cfg)
    te = Teacher(st)
    v1, v2, m, y = _batch(cfg)
    out = st(v1, v2, m, y, teacher_sim=te(v1))
    w = cfg.objectives
    expected = w.asl.weight * out["asl"] + w.swav.weight * out["swav"] + w.mim.weight * out["mim"] \
        + w.distill.weight * out["distill"]
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    assert all(p.grad is not None for n, p in st.named_parameters() if p.requires_grad and "mask_token" not in n)
    assert all(p.grad is None for p in te.parameters())


@pytest.mark.parametrize("off", ["asl", "swav", "mim", "distill"])
def test_switched_off_objective_is_absent(off):
    cfg = load_config("configs/test_tiny.yaml", [f"objectives.{off}.enabled=false"])
    st = Student(cfg)
    v1, v2, m, y = _batch(cfg)
    te = Teacher(st) if off != "distill" else None
    out = st(v1, v2, m, y, teacher_sim=te(v1) if te else None)
    assert off not in out and torch.isfinite(out["loss"])
    if off == "swav":
        assert st.prototype_head is None
    if off == "mim":
        assert st.mim_decoder is None


def test_teacher_ema_update_formula_and_fp32():
    torch.manual_seed(0)
    cfg = load_config("configs/test_tiny.yaml")
    st = Student(cfg)
    te = Teacher(st)
    before = copy.deepcopy(te.state_dict())
    with torch.no_grad():
        for p in st.parameters():
            p.add_(torch.randn_like(p))
    te.update(st, 0.9)
    sd_s = dict(st.named_parameters())
    for name, p in te.named_parameters():
        expected = 0.9 * before[name] + 0.1 * sd_s[name]
        assert torch.allclose(p, expected, atol=1e-6), name
        assert p.dtype == torch.float32 and not p.requires_grad
    # a bf16 student still updates an fp32 teacher
    st.to(torch.bfloat16)
    te.update(st, 0.5)
    assert all(p.dtype == torch.float32 for p in te.parameters())
    assert not te.training


def test_half_precision_student_runs_with_fp32_tensors_inside():
    """A bf16 student (as under DeepSpeed bf16) autocasts internally, so fp32 intermediates (e.g. an
    attention mask built on the fly) cannot meet bf16 activations in a matmul; losses stay fp32."""
    torch.manual_seed(0)
    cfg = load_config("configs/test_tiny.yaml")
    st = Student(cfg)
    te = Teacher(st)
    v1, v2, m, y = _batch(cfg)
    sim = te(v1)
    st = st.to(torch.bfloat16)
    fp32_bias = torch.zeros(1, dtype=torch.float32)
    st.backbone.model.blocks[0].attn.qkv.register_forward_hook(lambda mod, args, out: out + fp32_bias)
    out = st(v1.bfloat16(), v2.bfloat16(), m, y, teacher_sim=sim)
    assert all(out[k].dtype == torch.float32 and torch.isfinite(out[k]) for k in ("asl", "swav", "mim", "distill"))


def test_swav_view1_unmasked_reads_the_whole_image():
    """objectives.swav.view1=unmasked: SwAV's first view is the unmasked image (as with SimMIM off), paid for by
    one more backbone forward; the default feeds SwAV the masked view 1 (no extra forward)."""
    cfg = load_config("configs/test_tiny.yaml")
    v1, v2, m, y = _batch(cfg, b=4)
    swav, calls = {}, {}
    for name, sets in {"masked": [], "unmasked": ["objectives.swav.view1=unmasked"],
                       "mim_off": ["objectives.mim.enabled=false"]}.items():
        torch.manual_seed(0)  # the MIM decoder is built last: same backbone and heads in all three
        st = Student(load_config("configs/test_tiny.yaml", sets))
        n = []
        st.backbone.register_forward_hook(lambda *a: n.append(1))
        out = st(v1, v2, m, y, teacher_sim=Teacher(st)(v1))
        swav[name], calls[name] = out["swav"].item(), len(n) - 1  # minus the teacher's forward
    assert calls == {"masked": 2, "unmasked": 3, "mim_off": 2}
    assert swav["unmasked"] == pytest.approx(swav["mim_off"], rel=1e-6)
    assert swav["masked"] != pytest.approx(swav["mim_off"], rel=1e-3)
