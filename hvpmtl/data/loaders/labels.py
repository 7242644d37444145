"""Dense label vectors [B, C] from the CSR label table, scattered on the target device.

The table stays where it is (the mapped data index, or a LabelList): each batch gathers its own
labels into a padded [B, K] slice (K = most labels in the batch), and only that slice crosses to the
device (18M images x ~10 labels would take GBs on every GPU, and as int64 copies GBs on every rank).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class LabelTable:
    def __init__(self, samples, num_classes: int, threshold: Optional[float] = None):
        """`samples`: a LabelList or IndexedSamples (anything with label_rows, label_values, max_class)."""
        top = samples.max_class()
        if top >= num_classes:
            raise ValueError(f"{samples.source}: class index {top} >= num_classes {num_classes}")
        self.samples, self.num_classes, self.threshold = samples, num_classes, threshold

    def __len__(self) -> int:
        return len(self.samples)

    def sparse(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (classes, confs) [B, K]; padding points at an extra column C with conf 0."""
        ids = index.to("cpu", torch.int64).numpy() if isinstance(index, torch.Tensor) else np.asarray(index, np.int64)
        start, count = self.samples.label_rows(ids)
        k = max(1, int(count.max())) if len(ids) else 1
        ar = np.arange(k)
        valid = ar[None, :] < count[:, None]
        pos = np.where(valid, start[:, None] + ar[None, :], 0)
        cls, conf = self.samples.label_values(pos[valid])
        out_c = np.full(pos.shape, self.num_classes, np.int64)
        out_f = np.zeros(pos.shape, np.float32)
        out_c[valid], out_f[valid] = cls, conf
        conf_t = torch.from_numpy(out_f)
        if self.threshold is not None:
            conf_t = (conf_t >= self.threshold).float()
        return torch.from_numpy(out_c), conf_t

    def dense(self, index, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 [B, C]: the confidences (or multi-hot conf >= threshold)."""
        cls, conf = self.sparse(index)
        device = torch.device(device)
        if device.type != "cpu":  # [B, K] is small: a plain copy beats pinning a new buffer per batch
            cls, conf = cls.to(device), conf.to(device)
        out = torch.zeros(len(cls), self.num_classes + 1, device=device)
        out.scatter_(1, cls, conf)
        return out[:, : self.num_classes].contiguous()
