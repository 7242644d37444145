"""A timm Swin / ViT backbone as a 4-level feature pyramid (strides 4, 8, 16, 32) for dense tasks.

`self.body` is the plain timm model (`timm.create_model(name, num_classes=0)`), so its state dict has
exactly the keys of an `hvpmtl export` (hvpmtl.eval.export.read_backbone_file) and `load_backbone`
loads one with no key mapping.

Swin: the four stages through timm's `forward_intermediates` (NCHW). Built with `dynamic_img_size=True`
(timm 1.0.31: `strict_img_size=False`, attention masks made per forward for the input at hand, feature
maps padded to whole windows) and `always_partition=True`: every stage keeps the 7x7 windows and the
shift of the recipe whatever the input size, as Swin detection backbones do, instead of shrinking the
windows (and dropping the shift) to the grid at `img_size`. The window sizes, and so the parameter
shapes, are then those of the standard model; an export made at a size whose grid was smaller than a
window has its relative-position tables resampled by timm's own checkpoint filter.

ViT: a ViTDet-style simple feature pyramid (Li et al. 2022) from the last map (stride 16, after the
final norm): two 2x deconvolutions -> stride 4, one -> 8, identity -> 16, 2x max-pool -> 32, each
followed by a 1x1 convolution and a LayerNorm to a common width. `dynamic_img_size=True`: the position
embedding is interpolated to the input's grid in each forward.

Inputs must be multiples of 32 on both sides (torchvision's detection transform pads batches to that).
"""
from __future__ import annotations

import sys
from collections import OrderedDict

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

STRIDES = [4, 8, 16, 32]
SHOW_KEYS = 5  # keys named in a refusal


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one stride-16 map [B, D, H, W] to four maps of `width` channels."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        half, quarter = dim // 2, dim // 4
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, half, 2, stride=2), LayerNorm2d(half), nn.GELU(),
                          nn.ConvTranspose2d(half, quarter, 2, stride=2)),  # stride 4
            nn.ConvTranspose2d(dim, half, 2, stride=2),  # stride 8
            nn.Identity(),  # stride 16
            nn.MaxPool2d(2, stride=2),  # stride 32
        ])
        self.projs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, width, 1, bias=False), LayerNorm2d(width))
            for c in (quarter, half, dim, dim)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [proj(scale(x)) for scale, proj in zip(self.scales, self.projs)]


class BackbonePyramid(nn.Module):
    """forward(x [B,3,H,W]) -> OrderedDict "0".."3" of NCHW maps at strides 4, 8, 16, 32.

    img_size: the size the backbone was pre-trained at (ViT's position-embedding grid; Swin's only
    use of it is the stored default); other input sizes work, multiples of 32.
    vit_width: the common width of the ViT pyramid's levels (Swin's are its stage widths).
    """

    def __init__(self, backbone: str, img_size: int = 224, drop_path_rate: float = 0.0, *, vit_width: int = 256):
        super().__init__()
        if not backbone.startswith(("swin_", "vit_")):
            raise ValueError(f"backbone '{backbone}': only timm Swin (swin_*) and ViT (vit_*) models are supported")
        self.name, self.img_size = backbone, img_size
        self.is_vit = backbone.startswith("vit_")
        kw = dict(pretrained=False, num_classes=0, img_size=img_size, drop_path_rate=drop_path_rate,
                  dynamic_img_size=True)
        if not self.is_vit:
            kw["always_partition"] = True
        self.body = timm.create_model(backbone, **kw)
        if self.is_vit:
            patch = self.body.patch_embed.patch_size[0]
            if patch != 16:
                raise ValueError(f"backbone '{backbone}': the ViT pyramid needs patch size 16 (stride 16), not {patch}")
            self.sfp = SimpleFeaturePyramid(self.body.num_features, vit_width)
            self.out_channels = [vit_width] * 4
            self.strides = list(STRIDES)
        else:
            info = self.body.feature_info
            self.out_channels = [int(i["num_chs"]) for i in info]
            self.strides = [int(i["reduction"]) for i in info]
            if self.strides != STRIDES:
                raise ValueError(f"backbone '{backbone}': stage strides {self.strides}, the pyramid needs {STRIDES}")

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"{self.name} pyramid: input {h}x{w} is not a multiple of 32 on both sides "
                             "(pad it, as torchvision's GeneralizedRCNNTransform(size_divisible=32) does)")
        if self.is_vit:
            last = self.body.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
            maps = self.sfp(last)
        else:
            maps = self.body.forward_intermediates(x, norm=True, intermediates_only=True)
        return OrderedDict((str(i), m) for i, m in enumerate(maps))

    def load_backbone(self, state: dict[str, torch.Tensor]) -> dict:
        """Load an exported backbone (plain timm keys) into `self.body`, strictly.

        A classifier head (`head.*`) in the file is ignored and reported. Position embeddings and
        relative-position tables of another size are resampled by the model's own timm checkpoint
        filter (as `timm.create_model(pretrained=True)` does). Raises ValueError naming the missing and
        unexpected keys (first few + counts), or the shapes that still differ after resampling.
        Returns {"loaded": number of tensors, "ignored": [keys]}.
        """
        ignored = sorted(k for k in state if k.startswith("head."))
        kept = {k: v for k, v in state.items() if not k.startswith("head.")}
        own = self.body.state_dict()
        missing = sorted(set(own) - set(kept))
        unexpected = sorted(set(kept) - set(own) - _buffers_the_filter_drops(kept))
        if missing or unexpected:
            raise ValueError(f"backbone state does not fit timm '{self.name}': "
                             f"{len(missing)} missing {missing[:SHOW_KEYS]}, "
                             f"{len(unexpected)} unexpected {unexpected[:SHOW_KEYS]}; was it exported from "
                             "another architecture?")
        filter_fn = getattr(sys.modules[type(self.body).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            kept = filter_fn(kept, self.body)
        bad = [f"{k} {tuple(kept[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
               if k in kept and kept[k].shape != v.shape]
        if bad:
            raise ValueError(f"backbone state does not fit timm '{self.name}': {len(bad)} shapes differ "
                             f"{bad[:SHOW_KEYS]}")
        self.body.load_state_dict(kept, strict=True)
        return {"loaded": len(kept), "ignored": ignored}


def _buffers_the_filter_drops(state: dict) -> set[str]:
    """Non-persistent buffers that older Swin files carry and timm's filter drops (not backbone weights)."""
    return {k for k in state if k.endswith(("relative_position_index", "attn_mask"))}
