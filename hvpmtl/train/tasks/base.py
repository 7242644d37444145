"""What a fine-tuning task supplies to the fine-tuner (hvpmtl/train/finetune.py), which runs every task on the
one loop of hvpmtl/train/runtime.py: its loaders, its model (from an exported backbone or at random), its
parameter groups, the loss of a micro-batch, the evaluation, an image panel, and what the exported model's
file says about itself. Also the two things the dense tasks share: loading an export into a BackbonePyramid
(refusing a file that leaves any backbone weight unloaded) and layer-wise LR decay over that backbone.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from hvpmtl.config import ConfigError


class FinetuneTask:
    metric = ""  # the evaluation figure "best" follows, e.g. val/top1, eval/bbox_AP

    def __init__(self, trainer):
        t = trainer
        self.cfg, self.rank, self.world, self.local_rank = t.cfg, t.rank, t.world, t.local_rank
        self.device, self.input_dtype, self.log = t.device, t.input_dtype, t.log
        self.loader = self.val_loader = None
        self.num_classes, self.classes = 0, []

    def describe(self) -> str:
        return f"{self.num_classes} classes"

    def build_loaders(self) -> None:
        """Sets self.loader (training, the loader interface of hvpmtl.data.loaders.dali_loader), self.val_loader,
        self.num_classes and self.classes (names, written to classes.json)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        raise NotImplementedError

    def loss(self, engine, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss (what is back-propagated) and its parts (logged as train/<name>)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Over every validation image of all ranks; the same figures on every rank."""
        raise NotImplementedError

    def panel(self, model: nn.Module) -> np.ndarray | None:
        """An image of the model's predictions on a few validation images (rank 0), or None."""
        return None

    def export_metadata(self) -> dict[str, str]:
        return {}


def read_init(cfg) -> dict[str, torch.Tensor]:
    """The exported backbone of model.init as a timm state dict (every `hvpmtl export` format, read by
    hvpmtl.checkpoint.read_backbone_file: never unpickled beyond tensors and numpy arrays)."""
    from hvpmtl import checkpoint

    try:
        state, _ = checkpoint.read_backbone_file(cfg.model.init)
    except (ValueError, checkpoint.CheckpointError) as e:  # unreadable, or a file that would run code
        raise ConfigError(f"model.init: {e}") from None
    return state


def load_pyramid_init(pyramid, cfg, log) -> None:
    """model.init into a BackbonePyramid: every backbone weight loaded, or a ConfigError naming the file and
    the missing/unexpected keys (a file of another architecture or toolbox would otherwise load nothing)."""
    if cfg.model.random_init:
        return
    state = read_init(cfg)
    try:
        report = pyramid.load_backbone(state)
    except ValueError as e:
        raise ConfigError(f"model.init {cfg.model.init}: does not fit timm '{cfg.model.backbone}': {e}") from None
    ignored = report.get("ignored", [])
    log(f"backbone from {cfg.model.init}: {report.get('loaded', len(state))} tensors loaded, 0 missing"
        + (f", {len(ignored)} ignored ({', '.join(ignored[:3])})" if ignored else ""))


def backbone_param_groups(model: nn.Module, backbone: nn.Module, cfg, lr: float) -> list[dict]:
    """AdamW groups for a dense model: the timm `backbone` (a part of `model`) with layer-wise LR decay (timm's
    param_groups_layer_decay, as for classification), the new layers (neck, heads) at the full lr; no weight
    decay on norms, biases, position embeddings and tokens (timm's rule: 1-D tensors and no_weight_decay())."""
    from timm.optim import param_groups_layer_decay

    nwd = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
    groups = param_groups_layer_decay(backbone, cfg.optim.weight_decay, no_weight_decay_list=nwd,
                                      layer_decay=cfg.optim.layer_decay)
    inside = {id(p) for p in backbone.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in inside:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups += [{"params": decay, "weight_decay": cfg.optim.weight_decay, "lr_scale": 1.0},
               {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups
