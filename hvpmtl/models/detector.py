"""Mask R-CNN (torchvision) on an hvpmtl backbone: BackbonePyramid -> FPN -> RPN -> RoI heads.

The pre-trained weights go into `model.backbone.body` (a BackbonePyramid): `model.backbone.body.load_backbone(
state)` with the state of hvpmtl.eval.export.read_backbone_file.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torchvision.models.detection import MaskRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from hvpmtl.data.loaders.augment import IMAGENET_MEAN, IMAGENET_STD
from hvpmtl.models.pyramid import BackbonePyramid

# the pre-training's normalisation (hvpmtl.data.loaders.augment, in 0..255 there), for images in 0..1
IMAGE_MEAN = [m / 255 for m in IMAGENET_MEAN]
IMAGE_STD = [s / 255 for s in IMAGENET_STD]


class PyramidFPN(nn.Module):
    """BackbonePyramid + torchvision's FPN (+ a max-pooled 5th level): what torchvision's detectors take as
    `backbone` (out_channels; an OrderedDict "0".."3", "pool" at strides 4..64)."""

    def __init__(self, body: BackbonePyramid, fpn_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


def build_maskrcnn(backbone: str, num_classes: int, *, img_size: int = 224, drop_path_rate: float = 0.0,
                   min_size=(800,), max_size: int = 1333, fpn_channels: int = 256, vit_width: int = 256,
                   **maskrcnn_kwargs) -> MaskRCNN:
    """torchvision MaskRCNN with a BackbonePyramid of timm `backbone` (random weights; load them into
    `model.backbone.body`) and an FPN of `fpn_channels`.

    num_classes counts the background: K categories -> K + 1 (labels 1..K, hvpmtl.data.formats.coco).
    Images go in as float RGB in 0..1, any size. Resizing, normalisation and batching are torchvision's
    GeneralizedRCNNTransform: in training the short side is a random choice of `min_size` (a tuple gives
    the multi-scale recipe, e.g. (480, 512, ..., 800)), in eval its last value; the long side is capped at
    `max_size`; images are normalised with the pre-training's mean/std and a batch is zero-padded to
    multiples of 32 (size_divisible=32, which the pyramid needs). Eval outputs are mapped back to each
    image's original size (boxes xyxy, masks [n,1,H,W] probabilities). The anchors (32..512, ratios
    0.5/1/2 on the five FPN levels), the RPN, MultiScaleRoIAlign on levels "0".."3", the box and mask
    heads and the five losses are torchvision's defaults; `maskrcnn_kwargs` go to MaskRCNN (e.g.
    box_detections_per_img, rpn_batch_size_per_image).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background: at least 2 (1 category + background), got {num_classes}")
    if isinstance(min_size, int):
        min_size = (min_size,)
    min_size = tuple(int(s) for s in min_size)
    pyramid = BackbonePyramid(backbone, img_size=img_size, drop_path_rate=drop_path_rate, vit_width=vit_width)
    maskrcnn_kwargs.setdefault("size_divisible", 32)
    return MaskRCNN(PyramidFPN(pyramid, fpn_channels), num_classes=num_classes, min_size=min_size,
                    max_size=max_size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, **maskrcnn_kwargs)
