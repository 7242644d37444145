"""Per-step schedules, precomputed once per run (dinov2's CosineScheduler; timm keeps its schedulers apart
from the optimizer the same way). One shape serves the learning rate of both trainers and the EMA
teacher's momentum:

    s < warmup_steps:  start + (peak - start) * (s + 1) / warmup_steps   (linear; step 0 already moves off start)
    s >= warmup_steps: final + (peak - final) * (1 + cos(pi * p)) / 2,
                       p = min(1, (s - warmup_steps) / max(1, total_steps - warmup_steps))

`schedule[s]` is the value for optimizer step s (0-based for the LR, the count of steps done for the
momentum); past the end it stays at `final`. The LR enters DeepSpeed through a LambdaLR over the same
array, so a resumed run continues it exactly (the scheduler's state is its step count).
"""
from __future__ import annotations

import numpy as np
import torch


class CosineSchedule:
    def __init__(self, peak: float, final: float, total_steps: int, warmup_steps: int = 0, start: float = 0.0):
        if total_steps < 0 or warmup_steps < 0:
            raise ValueError(f"schedule: steps must be >= 0, got total {total_steps}, warm-up {warmup_steps}")
        self.peak, self.final = float(peak), float(final)
        s = np.arange(max(total_steps, warmup_steps) + 1, dtype=np.float64)
        progress = np.clip((s - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
        values = final + (peak - final) * 0.5 * (1 + np.cos(np.pi * progress))
        if warmup_steps:
            w = s[:warmup_steps]
            values[:warmup_steps] = start + (peak - start) * (w + 1) / warmup_steps
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, step: int) -> float:
        return float(self.values[min(int(step), len(self.values) - 1)])


def lr_schedule(optim_cfg, peak: float, steps_per_epoch: int, start: float = 0.0) -> CosineSchedule:
    """The learning rate of either trainer: warm-up over optim.warmup_epochs from `start`, cosine to
    optim.min_lr at the end of optim.epochs."""
    return CosineSchedule(peak, optim_cfg.min_lr, optim_cfg.epochs * steps_per_epoch,
                          int(round(optim_cfg.warmup_epochs * steps_per_epoch)), start)


def momentum_schedule(distill_cfg, total_steps: int) -> CosineSchedule:
    """The EMA teacher's momentum after each optimizer step: constant, or BYOL/DINO's cosine from
    objectives.distill.momentum to momentum_end over the run."""
    final = distill_cfg.momentum_end if distill_cfg.momentum_schedule == "cosine" else distill_cfg.momentum
    return CosineSchedule(distill_cfg.momentum, final, total_steps)


def lambda_lr(optimizer, schedule: CosineSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A torch scheduler (what DeepSpeed steps) that scales each parameter group's initial lr by
    schedule[s] / schedule.peak: layer-wise LR scales stay proportional."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule[s] / schedule.peak)
