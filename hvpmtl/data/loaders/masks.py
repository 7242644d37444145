"""SimMIM masks, the one generator used everywhere (the loaders, the random-tensor source, the
benchmarks): ceil(N * ratio) random mask_patch_size blocks out of the (img_size / mask_patch_size)^2
grid, repeated up to the model's patch grid (56x56 for Swin patch 4 at 224, 14x14 for ViT patch 16).

Each sample's mask is a function of (seed, epoch, sample id) alone, through a counter-based hash
(SplitMix64's finaliser), so it does not depend on the batch a sample lands in, the rank, a resume
or the device: the generator is integer torch ops on the ids' device (the GPU when DALI runs there),
bit-identical on CPU and GPU. int64 arithmetic wraps like uint64; the right shifts are made logical
by masking off the sign bits.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _i64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors holding uint64 bits (wrapping arithmetic)."""
    x = x + _i64(_GOLDEN)
    x = (x ^ _shr(x, 30)) * _i64(_M1)
    x = (x ^ _shr(x, 27)) * _i64(_M2)
    return x ^ _shr(x, 31)


class SimMIMMaskGenerator:
    def __init__(self, img_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float):
        if mask_patch_size <= 0 or model_patch_size <= 0:
            raise ValueError(f"mask_patch_size ({mask_patch_size}) and the model's patch size ({model_patch_size}) "
                             "must be > 0")
        if img_size % mask_patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of mask_patch_size {mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(f"mask_patch_size {mask_patch_size} is not a multiple of the model's patch size "
                             f"{model_patch_size}")
        self.rand_size = img_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.num_blocks = self.rand_size ** 2
        self.num_masked = math.ceil(self.num_blocks * mask_ratio)

    @property
    def grid(self) -> int:
        return self.rand_size * self.scale

    def __call__(self, ids, seed: int, epoch: int, device=None) -> torch.Tensor:
        """bool [B, grid, grid] for the sample ids (a tensor, on whose device the masks are made, or an
        array); True = masked."""
        if not isinstance(ids, torch.Tensor):
            ids = torch.from_numpy(np.asarray(ids, np.int64))
        ids = ids.to(device if device is not None else ids.device, torch.int64).reshape(-1, 1)
        key = splitmix64(splitmix64(torch.tensor(seed & (2**63 - 1), dtype=torch.int64)) ^ int(epoch)).to(ids.device)
        blocks = torch.arange(self.num_blocks, dtype=torch.int64, device=ids.device).reshape(1, -1)
        scores = splitmix64(key ^ splitmix64(ids * self.num_blocks + blocks))
        # order by the top 63 bits (non-negative as int64); stable, so equal scores cannot differ by device
        chosen = torch.argsort(_shr(scores, 1), dim=1, stable=True)[:, : self.num_masked]
        m = torch.zeros(len(ids), self.num_blocks, dtype=torch.bool, device=ids.device)
        m.scatter_(1, chosen, True)
        m = m.view(-1, self.rand_size, self.rand_size)
        return m.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)
