"""UperNet for semantic segmentation on a BackbonePyramid (the paper's ADE20K protocol).

The decoder is segmentation-models-pytorch 0.6.0's, used as a library piece. What was checked in smp
(`segmentation_models_pytorch/decoders/upernet/decoder.py`, `base/heads.py`, `base/initialization.py`):
- `UPerNetDecoder(encoder_channels, encoder_depth, decoder_channels, use_norm)` fits as is. It reads
  only `encoder_channels[2:]` (the stride 4, 8, 16, 32 widths; any widths) and `forward(features)` drops
  `features[:2]`, so our four maps go in after two placeholders. It holds what mmseg's UPerHead holds:
  a PSP module on the last level (pool scales 1, 2, 3, 6, 1x1 ConvBNReLU each, 3x3 bottleneck), 1x1
  lateral + 3x3 output ConvBNReLU per FPN level, top-down bilinear upsample-and-add, all levels resized
  to stride 4, concatenated and fused by a 3x3 ConvBNReLU. Additions/differences vs mmseg: a LayerNorm
  on each input level (mmseg's Swin adds one per output stage too; ViT's pyramid already ends in one,
  so that level is normalised twice, harmlessly); the PSP bottleneck always uses BatchNorm.
- Not used: smp's `UPerNet` model (it builds its own encoder from smp/timm names: our backbone must be
  the pyramid that loads an hvpmtl export) and its `SegmentationHead` (upsamples x4 with
  align_corners=True, and has no dropout). The head here is mmseg's: Dropout2d(0.1), 1x1 conv, bilinear
  resize (align_corners=False) to the input size.
- Initialisation as smp's model does it: `initialize_decoder` (Kaiming) on the decoder,
  `initialize_head` (Xavier) on the classifier.
The optional auxiliary head is mmseg's FCNHead of the UperNet configs: on level "2" (stride 16), one
3x3 ConvBNReLU to 256, Dropout2d(0.1), 1x1 conv (mmseg weights its loss 0.4).

BatchNorm: the decoder uses plain nn.BatchNorm2d; with several ranks the caller converts it
(`nn.SyncBatchNorm.convert_sync_batchnorm(model)`, as mmseg's SyncBN) since a few crops per GPU give
poor batch statistics.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.base import initialization as smp_init
from segmentation_models_pytorch.base import modules as smp_modules
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

from hvpmtl.models.pyramid import BackbonePyramid

AUX_LEVEL = "2"  # stride 16, mmseg's in_index=2
AUX_CHANNELS = 256
HEAD_DROPOUT = 0.1


class UperNetSegmenter(nn.Module):
    """pyramid (BackbonePyramid or anything with `out_channels` and the same forward) + UperNet.

    forward(x [B,3,H,W]) -> logits [B, num_classes, H, W]; forward(x, with_aux=True) -> (logits,
    aux_logits or None), both at the input size. Inputs are zero-padded (the normalised mean colour) up
    to a multiple of `pad_to` for the backbone and the logits cut back, so any size can be evaluated
    whole."""

    def __init__(self, pyramid: nn.Module, num_classes: int, *, decoder_channels: int = 512, aux_head: bool = False,
                 pad_to: int = 32):
        super().__init__()
        channels = [int(c) for c in pyramid.out_channels]
        if len(channels) != 4:
            raise ValueError(f"UperNet needs a 4-level pyramid (strides 4..32), got {len(channels)} levels")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.pyramid, self.num_classes, self.pad_to = pyramid, num_classes, pad_to
        # smp reads encoder_channels[2:] (it expects strides 1, 2 first): two placeholders
        self.decoder = UPerNetDecoder(encoder_channels=[3, 0, *channels], encoder_depth=5,
                                      decoder_channels=decoder_channels)
        self.classifier = nn.Sequential(nn.Dropout2d(HEAD_DROPOUT), nn.Conv2d(decoder_channels, num_classes, 1))
        self.aux = None
        if aux_head:
            self.aux = nn.Sequential(
                smp_modules.Conv2dReLU(channels[int(AUX_LEVEL)], AUX_CHANNELS, kernel_size=3, padding=1),
                nn.Dropout2d(HEAD_DROPOUT), nn.Conv2d(AUX_CHANNELS, num_classes, 1))
            smp_init.initialize_decoder(self.aux[0])
            smp_init.initialize_head(self.aux[2])
        smp_init.initialize_decoder(self.decoder)
        smp_init.initialize_head(self.classifier)

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        h, w = x.shape[-2:]
        ph, pw = -h % self.pad_to, -w % self.pad_to
        xp = F.pad(x, (0, pw, 0, ph)) if ph or pw else x
        maps = list(self.pyramid(xp).values())
        logits = self._to_input(self.classifier(self.decoder([None, None, *maps])), xp, h, w)
        if not with_aux:
            return logits
        aux = None if self.aux is None else self._to_input(self.aux(maps[int(AUX_LEVEL)]), xp, h, w)
        return logits, aux

    @staticmethod
    def _to_input(logits: torch.Tensor, xp: torch.Tensor, h: int, w: int) -> torch.Tensor:
        logits = F.interpolate(logits, size=xp.shape[-2:], mode="bilinear", align_corners=False)
        return logits[:, :, :h, :w]


def build_upernet(backbone: str, num_classes: int, *, img_size: int = 512, drop_path_rate: float = 0.0,
                  decoder_channels: int = 512, aux_head: bool = False) -> UperNetSegmenter:
    """UperNet on `BackbonePyramid(backbone, img_size, drop_path_rate)`; load weights with
    `model.pyramid.load_backbone(state)` (the state of `read_backbone_file`)."""
    pyramid = BackbonePyramid(backbone, img_size=img_size, drop_path_rate=drop_path_rate)
    return UperNetSegmenter(pyramid, num_classes, decoder_channels=decoder_channels, aux_head=aux_head)
