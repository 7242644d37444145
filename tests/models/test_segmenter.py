"""UperNet (smp's decoder) on real timm pyramids: shapes for Swin-T and ViT-T, gradients reaching the
backbone through all four levels, the auxiliary head, inputs of any size, and loading an export."""
import pytest
import timm
import torch
import torch.nn.functional as F

from hvpmtl.models.segmenter import UperNetSegmenter, build_upernet

NUM_CLASSES = 5


def _retain_level_grads(model):
    """Keeps the pyramid's four maps of the next forward, with their gradients."""
    kept = []

    def hook(_module, _inp, out):
        for m in out.values():
            m.retain_grad()
        kept[:] = list(out.values())

    model.pyramid.register_forward_hook(hook)
    return kept


@pytest.mark.parametrize("backbone", ["swin_tiny_patch4_window7_224", "vit_tiny_patch16_224"])
def test_shapes_and_backward_reach_every_level_and_the_backbone(backbone):
    torch.manual_seed(0)
    model = build_upernet(backbone, NUM_CLASSES, img_size=64, decoder_channels=32)
    assert isinstance(model, UperNetSegmenter) and model.pyramid.strides == [4, 8, 16, 32]
    levels = _retain_level_grads(model)
    x = torch.randn(2, 3, 64, 96)
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES, 64, 96)
    label = torch.randint(0, NUM_CLASSES, (2, 64, 96))
    label[:, :8] = 255
    F.cross_entropy(logits, label, ignore_index=255).backward()
    assert len(levels) == 4
    for i, m in enumerate(levels):  # the PSP (level 3) and every FPN lateral feed the output
        assert m.grad is not None and m.grad.abs().sum() > 0, f"level {i} gets no gradient"
    pe = model.pyramid.body.patch_embed.proj.weight
    assert pe.grad is not None and pe.grad.abs().sum() > 0  # through the whole backbone to its first layer
    assert model.decoder.psp.blocks[0][1][0].weight.grad.abs().sum() > 0


def test_any_input_size_in_eval_and_aux_head():
    torch.manual_seed(0)
    model = build_upernet("swin_tiny_patch4_window7_224", NUM_CLASSES, img_size=64, decoder_channels=32, aux_head=True)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 70, 50))  # not a multiple of 32: padded for the backbone, cut back
    assert out.shape == (1, NUM_CLASSES, 70, 50)
    model.train()
    levels = _retain_level_grads(model)
    logits, aux = model(torch.randn(2, 3, 64, 64), with_aux=True)
    assert logits.shape == aux.shape == (2, NUM_CLASSES, 64, 64)
    aux.sum().backward()  # the auxiliary head reads level "2" (stride 16) only
    assert levels[2].grad.abs().sum() > 0
    assert all(levels[i].grad is None or levels[i].grad.abs().sum() == 0 for i in (0, 1, 3))
    plain = build_upernet("vit_tiny_patch16_224", NUM_CLASSES, img_size=64, decoder_channels=16)
    assert plain.aux is None and plain(torch.randn(2, 3, 32, 32), with_aux=True)[1] is None


def test_trainer_loads_an_export_through_model_pyramid():
    name = "vit_tiny_patch16_224"
    torch.manual_seed(1)
    exported = timm.create_model(name, pretrained=False, num_classes=0, img_size=64).state_dict()
    model = build_upernet(name, NUM_CLASSES, img_size=64, decoder_channels=16)
    model.pyramid.load_backbone(exported)
    own = model.pyramid.body.state_dict()
    assert all(torch.equal(own[k], v) for k, v in exported.items())
    with pytest.raises(ValueError, match="missing"):
        model.pyramid.load_backbone({k: v for k, v in exported.items() if not k.startswith("blocks.0.")})


def test_rejects_a_pyramid_without_four_levels():
    class TwoLevels(torch.nn.Module):
        out_channels = [8, 16]

    with pytest.raises(ValueError, match="4-level"):
        UperNetSegmenter(TwoLevels(), NUM_CLASSES)
