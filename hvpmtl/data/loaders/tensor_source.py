"""Random-tensor batches, identical for any split of the global batch over ranks.

Each sample is drawn from a generator seeded by (seed, epoch, global index), and its SimMIM mask
comes from the shared generator (masks.py) keyed by the same, so a 1-rank and a 2-rank run see the
same global batch bit for bit. Used by the engine's exactness tests and by
benchmarks/train_step.py (a batch already on the device: the step with no input pipeline).
"""
from __future__ import annotations

import torch

from hvpmtl.config import DataConfig
from hvpmtl.data.loaders.file_reader import LeftOut
from hvpmtl.data.loaders.masks import SimMIMMaskGenerator
from hvpmtl.data.loaders.prepare import Skipped


class TensorSource(LeftOut):
    def __init__(self, cfg: DataConfig, *, batch_size: int, patch_size: int, rank: int, world_size: int,
                 num_samples: int = 4096, device="cpu", dtype=torch.float32):
        self.cfg, self.batch_size, self.rank, self.world = cfg, batch_size, rank, world_size
        self.num_samples = num_samples
        self.device, self.dtype = device, dtype
        self.mask_gen = SimMIMMaskGenerator(cfg.img_size, cfg.mask_patch_size, patch_size, cfg.mask_ratio)
        self.epoch = 0
        self.position = 0  # batches consumed in the current epoch
        self.skipped = Skipped(total=num_samples)  # nothing is left out

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                "world_size": self.world}

    def load_state_dict(self, sd: dict) -> None:
        # the position is global: saved with another world size or micro batch, it maps to the same sample
        consumed = sd["position"] * sd.get("batch_size", self.batch_size) * sd.get("world_size", self.world)
        self.epoch, self.position = sd["epoch"], consumed // (self.batch_size * self.world)

    def _sample(self, index: int):
        c = self.cfg
        g = torch.Generator().manual_seed(hash((c.seed, self.epoch, index)) & 0x7FFFFFFF)
        s = c.img_size
        v1 = torch.randn(3, s, s, generator=g)
        v2 = torch.randn(3, s, s, generator=g)
        labels = (torch.rand(c.num_classes, generator=g) < 0.1).float()
        return v1, v2, labels

    def __iter__(self):
        while self.position < len(self):
            # global batch k holds indices [k*B*W, (k+1)*B*W); rank r takes every W-th of them
            base = self.position * self.batch_size * self.world
            idx = [base + self.rank + self.world * i for i in range(self.batch_size)]
            v1, v2, y = zip(*(self._sample(i) for i in idx))
            self.position += 1
            put = lambda t, dt=None: torch.stack(t).to(self.device, dt or t[0].dtype, non_blocking=True)  # noqa: E731
            index = torch.tensor(idx, device=self.device)
            yield {"view1": put(v1, self.dtype), "view2": put(v2, self.dtype),
                   "mask": self.mask_gen(index, self.cfg.seed, self.epoch), "labels": put(y), "index": index}
