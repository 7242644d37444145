"""The two small heads: SwAV prototypes and the SimMIM pixel decoder."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrototypeHead(nn.Module):
    """Pooled features -> MLP -> L2-normalised z -> scores against K unit-norm prototypes.

    The prototypes are normalised inside forward rather than in place after each step: under
    ZeRO-2 the module's weights are copies of fp32 master partitions, so an in-place renorm
    would be overwritten at the next step. The effect is SwAV's: scores are always cosines.

    LayerNorm rather than SwAV's BatchNorm: the step must not depend on how the global batch
    is split over ranks (a 1-rank and a 2-rank run give the same loss).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_prototypes: int = 3000):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, out_dim))
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)

    def unit_prototypes(self) -> torch.Tensor:
        return F.normalize(self.prototypes.weight, dim=1)

    def forward(self, features: torch.Tensor):
        """features [B, H, W, D] -> (z [B, out_dim] unit norm, scores [B, K] = cosine to prototypes)."""
        z = F.normalize(self.mlp(features.mean(dim=(1, 2))), dim=-1)
        return z, z @ self.unit_prototypes().t()


class MIMDecoder(nn.Module):
    """SimMIM's one-layer decoder: 1x1 conv to stride^2 * 3 channels, PixelShuffle to full resolution."""

    def __init__(self, in_dim: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, stride * stride * 3, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(features.permute(0, 3, 1, 2)))
