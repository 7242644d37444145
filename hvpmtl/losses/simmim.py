"""SimMIM objective: L1 between the reconstruction and the normalised input, on masked pixels only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hvpmtl.losses import fp32


def upsample_mask(mask: torch.Tensor, img_hw: tuple[int, int]) -> torch.Tensor:
    """[B, Hp, Wp] patch mask -> [B, 1, H, W] float pixel mask."""
    sh, sw = img_hw[0] // mask.shape[1], img_hw[1] // mask.shape[2]
    return mask.float().repeat_interleave(sh, 1).repeat_interleave(sw, 2).unsqueeze(1)


def simmim_loss(reconstruction: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(|rec - img| * m) / (sum(m) + 1e-5) / channels, in fp32 (SimMIM's normalisation)."""
    m = upsample_mask(mask, images.shape[-2:]).to(fp32(images).dtype)
    l1 = F.l1_loss(fp32(reconstruction), fp32(images), reduction="none")
    return (l1 * m).sum() / (m.sum() + 1e-5) / images.shape[1]
