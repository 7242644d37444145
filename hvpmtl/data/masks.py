"""SimMIM masks: ceil(N * ratio) random mask_patch_size blocks out of the (img_size / mask_patch_size)^2
grid, repeated up to the model's patch grid (56x56 for Swin patch 4 at 224, 14x14 for ViT patch 16).

Each sample's mask is a function of (seed, epoch, sample id) alone, through a counter-based hash,
so it does not depend on the batch a sample lands in, the rank, or a resume.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a cheap, well-mixed hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class SimMIMMaskGenerator:
    def __init__(self, img_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float):
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

    def __call__(self, ids: np.ndarray, seed: int, epoch: int) -> torch.Tensor:
        """bool [B, grid, grid] for the sample ids; True = masked."""
        ids = np.asarray(ids, np.uint64).reshape(-1, 1)
        with np.errstate(over="ignore"):
            key = splitmix64(splitmix64(np.uint64(seed & (2**63 - 1))) ^ np.uint64(epoch))
            blocks = np.arange(self.num_blocks, dtype=np.uint64).reshape(1, -1)
            scores = splitmix64(key ^ splitmix64(ids * np.uint64(self.num_blocks) + blocks))
        chosen = np.argsort(scores, axis=1, kind="stable")[:, : self.num_masked]
        m = np.zeros((len(ids), self.num_blocks), bool)
        np.put_along_axis(m, chosen, True, axis=1)
        m = m.reshape(-1, self.rand_size, self.rand_size).repeat(self.scale, 1).repeat(self.scale, 2)
        return torch.from_numpy(m)
