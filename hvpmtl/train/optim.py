"""AdamW parameter groups for pre-training (no decay on norms, biases and the named extras)."""
from __future__ import annotations

import torch
import torch.nn as nn


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


def build_optimizer(model: nn.Module, cfg, no_decay_names: set[str]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, no_decay_names), lr=cfg.lr,
                             betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
