"""AdamW parameter groups and the per-step LR schedule (linear warm-up, cosine to min_lr)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from hvpmtl.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str] = frozenset()) -> list[dict]:
    """Decay on weight matrices only: no decay on norms, biases (ndim <= 1) and the named extras
    (mask token, label embeddings, prototypes, position embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in no_decay_names else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, no_decay_names: set[str]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, no_decay_names), lr=cfg.lr,
                             betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(step: int, warmup_steps: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    target = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return target / lr


def build_scheduler(optimizer, cfg: OptimConfig, steps_per_epoch: int, total_steps: int):
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, cfg.lr, cfg.min_lr))
