"""Per-step schedules, precomputed once per run (dinov2's Scheduler; timm keeps its schedulers apart
from the optimizer the same way). One warm-up serves every shape, the learning rate of every trainer and the
EMA teacher's momentum:

    s < warmup_steps:  start + (peak - start) * (s + 1) / warmup_steps   (linear; step 0 already moves off start)
    s >= warmup_steps, p = min(1, (s - warmup_steps) / max(1, total_steps - warmup_steps)):
        cosine: final + (peak - final) * (1 + cos(pi * p)) / 2
        poly:   final + (peak - final) * (1 - p) ** power            (mmseg's PolyLR, UperNet's recipes)
        step:   peak * rate ** (number of drops at or before s)      (mmdet's 1x: drops at epochs 8 and 11)

`schedule[s]` is the value for optimizer step s (0-based for the LR, the count of steps done for the
momentum); past the end it stays at its last value. The LR enters DeepSpeed through a LambdaLR over the same
array, so a resumed run continues it exactly (the scheduler's state is its step count).

The EMA teacher's policy lives beside its momentum: which backbone a run offers by default (`default_weights`:
the teacher only once less than TEACHER_MAX_INIT_SHARE of it is still its random start). This module sits
below train/, eval/ and checkpoint/, which all ask it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

TEACHER_MAX_INIT_SHARE = 0.01  # the EMA teacher is the default backbone below this share of its random start


class Schedule:
    def __init__(self, peak: float, final: float, total_steps: int, warmup_steps: int = 0, start: float = 0.0,
                 shape: str = "cosine", power: float = 1.0, drops: tuple[int, ...] = (), rate: float = 0.1,
                 length: int | None = None):
        """`length`: the run's last step when it ends before total_steps (values past it are never read, and
        a 10^5-epoch schedule capped at 2 steps must not allocate gigabytes)."""
        if total_steps < 0 or warmup_steps < 0:
            raise ValueError(f"schedule: steps must be >= 0, got total {total_steps}, warm-up {warmup_steps}")
        self.peak, self.final = float(peak), float(final)
        last = max(total_steps, warmup_steps)
        if length is not None:
            last = min(last, length)
        s = np.arange(last + 1, dtype=np.float64)
        progress = np.clip((s - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
        if shape == "cosine":
            values = final + (peak - final) * 0.5 * (1 + np.cos(np.pi * progress))
        elif shape == "poly":
            values = final + (peak - final) * (1 - progress) ** power
        elif shape == "step":
            values = peak * rate ** np.searchsorted(np.sort(np.asarray(drops, np.float64)), s, side="right")
        else:
            raise ValueError(f"schedule: unknown shape '{shape}'")
        if warmup_steps:
            w = s[:warmup_steps]
            values[:warmup_steps] = start + (peak - start) * (w + 1) / warmup_steps
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, step: int) -> float:
        return float(self.values[min(int(step), len(self.values) - 1)])


def lr_schedule(optim_cfg, peak: float, steps_per_epoch: int, start: float = 0.0,
                total_steps: int | None = None, length: int | None = None) -> Schedule:
    """The learning rate of any trainer: warm-up over optim.warmup_epochs from `start`, then optim.schedule
    (cosine by default) to optim.min_lr at `total_steps` (default: the end of optim.epochs); `length`: the
    run's last step, when optim.max_steps ends it before."""
    total = optim_cfg.epochs * steps_per_epoch if total_steps is None else total_steps
    shape = getattr(optim_cfg, "schedule", "cosine")
    drops = tuple(int(round(e * steps_per_epoch)) for e in getattr(optim_cfg, "decay_epochs", ()))
    return Schedule(peak, optim_cfg.min_lr, total, int(round(optim_cfg.warmup_epochs * steps_per_epoch)), start,
                    shape=shape, power=getattr(optim_cfg, "poly_power", 1.0), drops=drops,
                    rate=getattr(optim_cfg, "decay_rate", 0.1), length=length)


def momentum_schedule(distill_cfg, total_steps: int, length: int | None = None) -> Schedule:
    """The EMA teacher's momentum after each optimizer step: constant, or BYOL/DINO's cosine from
    objectives.distill.momentum to momentum_end over the run."""
    final = distill_cfg.momentum_end if distill_cfg.momentum_schedule == "cosine" else distill_cfg.momentum
    return Schedule(distill_cfg.momentum, final, total_steps, length=length)


def teacher_init_share(cfg, step: int) -> tuple[float, bool]:
    """How much of the EMA teacher is still its random start after `step` updates: the product of the
    momenta (momentum_schedule). Exact for a constant momentum or a cosine schedule
    of known length; else the constant lower bound m^step (second value False)."""
    d, o = cfg.objectives.distill, cfg.optim
    if d.momentum_schedule == "constant":
        return d.momentum ** step, True
    total = o.max_steps or (o.epochs * o.steps_per_epoch if o.steps_per_epoch else 0)
    if not total:
        return d.momentum ** step, False
    m = momentum_schedule(d, total, length=step)
    return math.exp(sum(math.log(max(m[t], 1e-300)) for t in range(1, step + 1))), True


def default_weights(cfg, step: int, has_teacher: bool) -> tuple[str, str]:
    """('teacher' | 'student', why): the teacher only once less than TEACHER_MAX_INIT_SHARE of it is its random
    initialisation; before that the student is the better-founded backbone."""
    if not has_teacher:
        return "student", "no EMA teacher in this run (distillation off)"
    share, exact = teacher_init_share(cfg, step)
    bound = "" if exact else " at least"
    if share < TEACHER_MAX_INIT_SHARE:
        return "teacher", f"after {step} steps{bound} {share:.2%} of the EMA teacher is its random start"
    return "student", (f"after {step} steps{bound} {share:.0%} of the EMA teacher is still its random start "
                       f"(the teacher is used below {TEACHER_MAX_INIT_SHARE:.0%})")


def lambda_lr(optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A torch scheduler (what DeepSpeed steps) that scales each parameter group's initial lr by
    schedule[s] / schedule.peak: layer-wise LR scales stay proportional."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule[s] / schedule.peak)
