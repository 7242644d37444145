"""hvpmtl.models.pyramid: shapes and strides at several input sizes, agreement with timm's own models, and
loading exported backbones (every `hvpmtl export` format) strictly."""
import pytest
import timm
import torch

from hvpmtl.eval.export import FORMATS, read_backbone_file, write_export
from hvpmtl.models.pyramid import BackbonePyramid

SWIN, VIT = "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def pyramids():
    torch.manual_seed(0)
    return {SWIN: BackbonePyramid(SWIN, img_size=224).eval(), VIT: BackbonePyramid(VIT, img_size=224).eval()}


@pytest.mark.parametrize("name, channels", [(SWIN, [96, 192, 384, 768]), (VIT, [256] * 4)])
@pytest.mark.parametrize("hw", [(64, 96), (128, 64)])
def test_four_levels_at_strides_4_to_32_for_inputs_other_than_img_size(pyramids, name, channels, hw):
    p = pyramids[name]
    assert p.strides == [4, 8, 16, 32] and p.out_channels == channels
    with torch.no_grad():
        out = p(torch.randn(2, 3, *hw))
    assert list(out) == ["0", "1", "2", "3"]
    for (k, m), s, c in zip(out.items(), p.strides, channels):
        assert m.shape == (2, c, hw[0] // s, hw[1] // s), k
        assert torch.isfinite(m).all()


def test_inputs_must_be_multiples_of_32(pyramids):
    with pytest.raises(ValueError, match="80x96 is not a multiple of 32"):
        pyramids[VIT](torch.zeros(1, 3, 80, 96))


def test_swin_stages_equal_timms_own_model_built_for_that_size():
    """An export of Swin built at 128 px (stage-4 windows shrunk to its 4x4 grid) loads with its tables resampled;
    stages 1-3 (same windows and shifts) then equal timm's own model at 128 px, NCHW."""
    torch.manual_seed(1)
    ref = timm.create_model(SWIN, pretrained=False, num_classes=0, img_size=128).eval()
    p = BackbonePyramid(SWIN, img_size=224).eval()
    info = p.load_backbone(ref.state_dict())
    assert info["loaded"] == len(ref.state_dict()) and info["ignored"] == []
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        got = p(x)
        expect = ref.forward_intermediates(x, intermediates_only=True)
    for k in range(3):
        torch.testing.assert_close(got[str(k)], expect[k], rtol=1e-4, atol=1e-4)
    assert got["3"].shape == expect[3].shape


def test_vit_stride16_level_is_the_normed_token_map_in_row_major_order():
    torch.manual_seed(2)
    p = BackbonePyramid(VIT, img_size=64).eval()
    ref = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=64).eval()
    p.load_backbone(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = ref.forward_features(x)[:, 1:]  # after the final norm, without the class token
        grid = tokens.reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(p(x)["2"], p.sfp.projs[2](grid), rtol=1e-4, atol=1e-4)


def _equal_weights(p: BackbonePyramid, state: dict) -> bool:
    own = p.body.state_dict()
    return all(torch.equal(own[k], v.to(own[k].dtype)) for k, v in state.items() if not k.startswith("head."))


@pytest.mark.parametrize("name", [SWIN, VIT])
def test_the_plain_timm_state_and_every_export_format_load_with_no_missing_key(tmp_path, name):
    torch.manual_seed(3)
    source = timm.create_model(name, pretrained=False, num_classes=0)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    p = BackbonePyramid(name)
    assert not _equal_weights(p, state)
    assert p.load_backbone(state) == {"loaded": len(p.body.state_dict()), "ignored": []}
    assert _equal_weights(p, state)
    files = {"timm": "b.safetensors", "mmdet": "b_mmdet.pth", "mmseg": "b_mmseg.pth", "detectron2": "b_d2.pth"}
    written = [write_export(state, tmp_path / f, fmt, {"timm_model": name, "img_size": 224}) for fmt, f in files.items()]
    written.append(write_export(state, tmp_path / "b_d2.pkl", "detectron2", {"timm_model": name, "img_size": 224}))
    assert set(files) == set(FORMATS)
    for path in written:
        read, _ = read_backbone_file(path)
        with torch.no_grad():  # move every weight off the source before each load
            for t in p.body.parameters():
                t.add_(1.0)
        assert not _equal_weights(p, state)
        assert p.load_backbone(read)["loaded"] == len(p.body.state_dict()), path.name
        assert _equal_weights(p, state), path.name


def test_a_classifier_head_is_ignored_and_reported():
    state = timm.create_model(VIT, pretrained=False, num_classes=7).state_dict()
    info = BackbonePyramid(VIT).load_backbone(state)
    assert info["ignored"] == ["head.bias", "head.weight"]


def test_a_missing_or_foreign_key_is_refused_by_name():
    state = timm.create_model(VIT, pretrained=False, num_classes=0).state_dict()
    p = BackbonePyramid(VIT)
    before = {k: v.clone() for k, v in p.body.state_dict().items()}
    missing = {k: v for k, v in state.items() if k != "blocks.3.mlp.fc2.weight"}
    with pytest.raises(ValueError, match=r"1 missing \['blocks.3.mlp.fc2.weight'\], 0 unexpected"):
        p.load_backbone(missing)
    with pytest.raises(ValueError, match=r"0 missing \[\], 1 unexpected \['decoder.weight'\]"):
        p.load_backbone({**state, "decoder.weight": torch.zeros(3)})
    swin = timm.create_model(SWIN, pretrained=False, num_classes=0).state_dict()
    with pytest.raises(ValueError, match=r"missing \['blocks.0.attn.proj.bias'.*another architecture"):
        p.load_backbone(swin)
    assert all(torch.equal(before[k], v) for k, v in p.body.state_dict().items())  # nothing half-loaded


def test_vit_position_embedding_of_another_size_is_resampled():
    src = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=96).state_dict()
    assert src["pos_embed"].shape == (1, 37, 192)
    p = BackbonePyramid(VIT, img_size=224)
    p.load_backbone(src)
    assert p.body.pos_embed.shape == (1, 197, 192)
    torch.testing.assert_close(p.body.pos_embed[:, :1], src["pos_embed"][:, :1])  # the class token's is kept


def test_only_swin_and_vit_with_patch_16_are_accepted():
    with pytest.raises(ValueError, match="only timm Swin"):
        BackbonePyramid("resnet18")
    with pytest.raises(ValueError, match="patch size 16"):
        BackbonePyramid("vit_small_patch8_224", img_size=64)
