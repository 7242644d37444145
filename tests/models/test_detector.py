"""hvpmtl.models.detector: torchvision Mask R-CNN on the pyramid trains (5 finite losses, gradients reach the
backbone) and predicts (boxes, labels, scores, masks at each image's size); tiny inputs."""
import pytest
import timm
import torch
from torchvision.models.detection import MaskRCNN

from hvpmtl.data.loaders.augment import IMAGENET_MEAN, IMAGENET_STD
from hvpmtl.models.detector import build_maskrcnn
from hvpmtl.models.pyramid import BackbonePyramid

SMALL = dict(min_size=(64, 96), max_size=128, fpn_channels=32, vit_width=64, rpn_pre_nms_top_n_train=200,
             rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
             box_batch_size_per_image=64, box_detections_per_img=8, box_score_thresh=0.0)
LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def images_and_targets():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 60, 80, generator=g), torch.rand(3, 70, 50, generator=g)]
    m0 = torch.zeros(2, 60, 80, dtype=torch.uint8)
    m0[0, 5:40, 5:30] = 1
    m0[1, 30:55, 40:75] = 1
    m1 = torch.zeros(1, 70, 50, dtype=torch.uint8)
    m1[0, 10:60, 8:45] = 1
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0], [40.0, 30.0, 75.0, 55.0]]),
                "labels": torch.tensor([1, 2]), "masks": m0},
               {"boxes": torch.tensor([[8.0, 10.0, 45.0, 60.0]]), "labels": torch.tensor([2]), "masks": m1},
               # a negative (an image without annotations, as hvpmtl.data.loaders.coco yields it)
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}]
    images.append(torch.rand(3, 64, 64, generator=g))
    return images, targets


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_train_mode_returns_the_five_losses_and_backward_reaches_the_backbone(name):
    torch.manual_seed(0)
    model = build_maskrcnn(name, 3, **SMALL).train()
    assert isinstance(model, MaskRCNN) and isinstance(model.backbone.body, BackbonePyramid)
    images, targets = images_and_targets()
    losses = model(images, targets)
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    body = model.backbone.body.body  # the plain timm model
    first = body.patch_embed.proj.weight.grad
    assert first is not None and first.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


def test_eval_mode_returns_detections_at_each_images_own_size():
    torch.manual_seed(0)
    model = build_maskrcnn("vit_tiny_patch16_224", 3, **SMALL).eval()
    images, _ = images_and_targets()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 3
    for o, im in zip(out, images):
        n = len(o["scores"])
        assert 0 < n <= SMALL["box_detections_per_img"]
        assert o["boxes"].shape == (n, 4) and o["labels"].dtype == torch.int64
        assert set(o["labels"].tolist()) <= {1, 2}
        assert o["masks"].shape == (n, 1, *im.shape[-2:])
        assert 0 <= o["masks"].min() and o["masks"].max() <= 1
        h, w = im.shape[-2:]
        assert (o["boxes"][:, [0, 2]] <= w).all() and (o["boxes"][:, [1, 3]] <= h).all()


def test_transform_uses_the_pretraining_normalisation_and_the_multiscale_recipe():
    model = build_maskrcnn("vit_tiny_patch16_224", 81, min_size=(480, 512, 800), max_size=1333, fpn_channels=32,
                           vit_width=32)
    t = model.transform
    assert t.image_mean == pytest.approx([m / 255 for m in IMAGENET_MEAN])
    assert t.image_std == pytest.approx([s / 255 for s in IMAGENET_STD])
    assert t.min_size == (480, 512, 800) and t.max_size == 1333 and t.size_divisible == 32
    assert model.roi_heads.box_predictor.cls_score.out_features == 81
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 81
    assert model.backbone.out_channels == 32
    with pytest.raises(ValueError, match="counts the background"):
        build_maskrcnn("vit_tiny_patch16_224", 1)


def test_an_exported_backbone_loads_into_model_backbone_body():
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict()
    model = build_maskrcnn("vit_tiny_patch16_224", 3, **SMALL)
    info = model.backbone.body.load_backbone(state)
    assert info["loaded"] == len(state)
    assert torch.equal(model.backbone.body.body.blocks[5].mlp.fc1.weight, state["blocks.5.mlp.fc1.weight"])
