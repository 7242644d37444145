"""Query2Label decoder: shapes, per-class linear, no query self-attention by default, cosine similarity."""
import math

import torch

from hvpmtl.models.label_decoder import GroupWiseLinear, LabelDecoder, sine_position_embedding


def test_shapes_and_default_has_no_self_attention():
    dec = LabelDecoder(in_dim=32, num_classes=11, dim=16, layers=2, heads=4, ffn_dim=24, dropout=0.0)
    logits, g = dec(torch.randn(3, 5, 4, 32))
    assert logits.shape == (3, 11) and g.shape == (3, 16)
    assert all(layer.self_attn is None for layer in dec.layers)


def test_queries_do_not_interact_without_self_attention():
    """Without self-attention, class c's logit depends only on its own query: changing another
    class's embedding leaves it unchanged."""
    torch.manual_seed(0)
    dec = LabelDecoder(in_dim=8, num_classes=5, dim=8, layers=2, heads=2, ffn_dim=16, dropout=0.0).eval()
    x = torch.randn(2, 3, 3, 8)
    before, _ = dec(x)
    with torch.no_grad():
        dec.label_embed[3] += 1.0
    after, _ = dec(x)
    keep = [0, 1, 2, 4]
    assert torch.allclose(before[:, keep], after[:, keep], atol=1e-6)
    assert not torch.allclose(before[:, 3], after[:, 3], atol=1e-4)
    sa = LabelDecoder(in_dim=8, num_classes=5, dim=8, layers=2, heads=2, ffn_dim=16, dropout=0.0,
                      self_attn=True).eval()
    b2, _ = sa(x)
    with torch.no_grad():
        sa.label_embed[3] += 1.0
    a2, _ = sa(x)
    assert not torch.allclose(b2[:, 0], a2[:, 0], atol=1e-6)


def test_group_wise_linear_matches_a_loop():
    gl = GroupWiseLinear(4, 3)
    h = torch.randn(2, 4, 3, dtype=torch.float64)
    gl = gl.double()
    out = gl(h)
    for b in range(2):
        for c in range(4):
            expected = sum(h[b, c, d].item() * gl.weight[c, d].item() for d in range(3)) + gl.bias[c].item()
            assert abs(out[b, c].item() - expected) < 1e-12


def test_label_similarity_is_cosine():
    dec = LabelDecoder(in_dim=4, num_classes=3, dim=4, layers=1, heads=1, ffn_dim=4)
    g = torch.randn(2, 4)
    s = dec.label_similarity(g)
    for b in range(2):
        for c in range(3):
            u, v = g[b].tolist(), dec.label_embed[c].tolist()
            cos = sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))
            assert abs(s[b, c].item() - cos) < 1e-5


def test_sine_position_embedding_distinct_and_bounded():
    pe = sine_position_embedding(3, 4, 8, "cpu", torch.float32)
    assert pe.shape == (12, 8) and pe.abs().max() <= 1
    assert torch.unique(pe, dim=0).shape[0] == 12


def test_group_decoding_shapes_and_head_matches_a_loop():
    from hvpmtl.models.label_decoder import GroupFullyConnected
    dec = LabelDecoder(in_dim=8, num_classes=10, dim=8, layers=1, heads=2, ffn_dim=16, groups=3)
    logits, g = dec(torch.randn(2, 3, 3, 8))
    assert logits.shape == (2, 10) and g.shape == (2, 8)
    head = GroupFullyConnected(10, 3, 4).double()  # 4 classes per group, the last group padded
    h = torch.randn(2, 3, 4, dtype=torch.float64)
    out = head(h)
    for b in range(2):
        for c in range(10):
            gi, k = divmod(c, 4)
            expected = float((h[b, gi] @ head.weight[gi, k]).detach()) + head.bias[c].item()
            assert abs(out[b, c].item() - expected) < 1e-12
