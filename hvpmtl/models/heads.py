"""The two small heads: SwAV prototypes and the SimMIM pixel decoder."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the GLOBAL batch (all ranks of `group`).

    Like SyncBatchNorm, so a step does not depend on how the global batch is split over ranks (1 rank
    of 2B = 2 ranks of B), but on every device: forward all-reduces [sum, sum of squares, count] once,
    and autograd's twin of that all-reduce (torch's functional collectives) sums the statistics' gradients in
    backward, which is exactly SyncBatchNorm's backward. nn.SyncBatchNorm itself refuses CPU tensors.
    The sums are accumulated in float64 (E[x^2] - E[x]^2 in fp32 would cancel); the same formula runs
    with one rank, so 1-rank and N-rank runs differ only by summation order. Eval mode uses the running
    statistics, which are identical on every rank because the batch statistics are.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, group=None):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"GlobalBatchNorm1d({self.num_features}) expects [N, {self.num_features}], "
                             f"got {tuple(x.shape)}")
        x64 = x.double()
        local = torch.cat([x64.sum(0), (x64 * x64).sum(0), x64.new_full((1,), x.shape[0])])
        if _distributed(self.group):
            local = funcol.all_reduce(local, "sum", self.group if self.group is not None else dist.group.WORLD)
        d = self.num_features
        n = local[-1]
        mean = local[:d] / n
        var = (local[d:2 * d] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises
        y = (x64 - mean) * torch.rsqrt(var + self.eps)
        y = y.to(torch.promote_types(x.dtype, torch.float32)) * self.weight + self.bias
        with torch.no_grad():  # running statistics as nn.BatchNorm1d: unbiased variance, momentum average
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
            unbiased = var * n / (n - 1).clamp_min(1)
            self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        return y


HEAD_NORMS = ("layernorm", "batchnorm")


class PrototypeHead(nn.Module):
    """Pooled features -> MLP -> L2-normalised z -> scores against K unit-norm prototypes.

    The prototypes are normalised inside forward rather than in place after each step: under
    ZeRO-2 the module's weights are copies of fp32 master partitions, so an in-place renorm
    would be overwritten at the next step. The effect is SwAV's: scores are always cosines.

    norm="batchnorm" is SwAV's projection head, Linear-BatchNorm-ReLU-Linear, with batch statistics over
    the global batch (GlobalBatchNorm1d): it removes the component every image shares, which otherwise
    dominates the pooled features of a young ViT (mean pairwise cosine of z at initialisation: 0.88 with
    LayerNorm, 0.26 with BatchNorm, demo model) and lets SwAV collapse to uniform codes (docs/DESIGN.md).
    norm="layernorm" (Linear-LayerNorm-GELU-Linear) has no batch statistics at all.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_prototypes: int = 3000,
                 norm: str = "layernorm"):
        super().__init__()
        if norm not in HEAD_NORMS:
            raise ValueError(f"PrototypeHead: norm must be one of {HEAD_NORMS}, got {norm!r}")
        if norm == "batchnorm":
            layers = [nn.Linear(in_dim, hidden_dim), GlobalBatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, out_dim))
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
