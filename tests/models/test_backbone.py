"""Backbone shapes for Swin and ViT, and SimMIM masking at the patch-embedding level."""
import pytest
import torch

from hvpmtl.models.backbone import MaskableBackbone


@pytest.mark.parametrize("name,img,grid,dim,patch", [
    ("swin_tiny_patch4_window7_224", 224, 7, 768, 4),
    ("vit_small_patch16_224", 64, 4, 384, 16),
    ("vit_tiny_patch16_224", 96, 6, 192, 16),
])
def test_feature_map_shape(name, img, grid, dim, patch):
    torch.manual_seed(0)
    bb = MaskableBackbone(name, img).eval()
    assert bb.patch_size == patch and bb.embed_dim == dim
    with torch.no_grad():
        f = bb(torch.randn(2, 3, img, img))
    assert f.shape == (2, grid, grid, dim)
    assert bb.stride == img // grid


@pytest.mark.parametrize("name,img", [("swin_tiny_patch4_window7_224", 224), ("vit_tiny_patch16_224", 64)])
def test_fully_masked_input_is_replaced_by_the_mask_token(name, img):
    """With every patch masked the image cannot reach the blocks: two different images give the same
    features. With no mask they differ, and a partial mask changes the output."""
    torch.manual_seed(0)
    bb = MaskableBackbone(name, img).eval()
    hp, wp = bb.patch_grid
    a, b = torch.randn(1, 3, img, img), torch.randn(1, 3, img, img)
    full = torch.ones(1, hp, wp, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(bb(a, full), bb(b, full), atol=1e-5)
        assert not torch.allclose(bb(a), bb(b), atol=1e-3)
        part = torch.zeros(1, hp, wp, dtype=torch.bool)
        part[:, : hp // 2] = True
        assert not torch.allclose(bb(a, part), bb(a), atol=1e-4)


def test_mask_grid_mismatch_is_a_clear_error():
    bb = MaskableBackbone("vit_tiny_patch16_224", 64)
    with pytest.raises(ValueError, match=r"mask grid \(2, 2\) does not match the patch grid \(4, 4\)"):
        bb(torch.randn(1, 3, 64, 64), torch.ones(1, 2, 2, dtype=torch.bool))


def test_mask_token_gets_gradient_only_when_used():
    bb = MaskableBackbone("vit_tiny_patch16_224", 64)
    bb(torch.randn(1, 3, 64, 64)).sum().backward()
    assert bb.mask_token.grad is None or bb.mask_token.grad.abs().sum() == 0
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, 0, 0] = True
    bb(torch.randn(1, 3, 64, 64), m).sum().backward()
    assert bb.mask_token.grad.abs().sum() > 0


def test_state_dict_keys_are_timms():
    import timm
    bb = MaskableBackbone("vit_tiny_patch16_224", 64)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64)
    assert set(bb.model.state_dict()) == set(ref.state_dict())
