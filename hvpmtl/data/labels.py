"""Dense label vectors [B, C] from the CSR label table, scattered on the target device.

Only a padded [B, K] slice (K = most labels in the batch) crosses to the device; the table stays
in host memory (18M images x ~10 labels would take GBs on every GPU).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from hvpmtl.data.tencent import LabelList


class LabelTable:
    def __init__(self, labels: LabelList, num_classes: int, threshold: Optional[float] = None):
        if len(labels.classes) and int(labels.classes.max()) >= num_classes:
            raise ValueError(f"{labels.source}: class index {int(labels.classes.max())} >= num_classes {num_classes}")
        self.indptr = torch.from_numpy(np.ascontiguousarray(labels.indptr, np.int64))
        self.classes = torch.from_numpy(np.ascontiguousarray(labels.classes, np.int64))
        self.confs = torch.from_numpy(np.ascontiguousarray(labels.confs, np.float32))
        self.num_classes = num_classes
        self.threshold = threshold

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def sparse(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (classes, confs) [B, K]; padding points at an extra column C with conf 0."""
        index = index.to("cpu", torch.int64)
        start, end = self.indptr[index], self.indptr[index + 1]
        count = end - start
        k = max(1, int(count.max())) if len(index) else 1
        ar = torch.arange(k)
        valid = ar[None, :] < count[:, None]
        pos = (start[:, None] + ar[None, :]).clamp(max=max(0, len(self.classes) - 1))
        if len(self.classes):
            cls = torch.where(valid, self.classes[pos], self.num_classes)
            conf = torch.where(valid, self.confs[pos], 0.0)
        else:
            cls = torch.full(pos.shape, self.num_classes, dtype=torch.int64)
            conf = torch.zeros(pos.shape)
        if self.threshold is not None:
            conf = (conf >= self.threshold).float()
        return cls, conf

    def dense(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 [B, C]: the confidences (or multi-hot conf >= threshold)."""
        cls, conf = self.sparse(index)
        device = torch.device(device)
        if device.type != "cpu":  # [B, K] is small: a plain copy beats pinning a new buffer per batch
            cls, conf = cls.to(device), conf.to(device)
        out = torch.zeros(len(cls), self.num_classes + 1, device=device)
        out.scatter_(1, cls, conf)
        return out[:, : self.num_classes].contiguous()
