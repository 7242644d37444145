"""Classification fine-tuning (SimMIM's recipe): single-label on an ImageFolder (top-1/top-5), or multi-label
on list files in the pre-training's format (mAP over every val image, each rank scoring its share of the
classes). A timm model with a fresh `num_classes` head, initialised from an exported backbone (timm resamples
position embeddings / relative-position tables when the size differs) or at random; AdamW with layer-wise LR
decay (timm's param_groups_layer_decay); label smoothing, optional mixup/cutmix (timm.data.Mixup) for
single-label; binary cross-entropy on the lists' confidences (or multi-hot at data.label_threshold) for
multi-label, no smoothing or mixup.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hvpmtl.config import ConfigError, FinetuneConfig
from hvpmtl.data.formats.issues import DataError
from hvpmtl.dist import all_gather_rows, sum_to_host
from hvpmtl.metrics import average_precision
from hvpmtl.train.tasks.base import FinetuneTask, read_init


def build_model(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """timm classifier; weights from model.init (any `hvpmtl export` format: base.read_init) unless random_init."""
    import timm
    from safetensors.torch import save_file

    m = cfg.model
    kw = dict(num_classes=num_classes, img_size=m.img_size, drop_path_rate=m.drop_path_rate, global_pool=m.global_pool)
    if m.backbone.startswith("vit_") and m.global_pool == "avg":
        kw["fc_norm"] = False  # keep the pre-trained final norm, pool after it (as the pre-training features)
    if m.random_init:
        return timm.create_model(m.backbone, pretrained=False, **kw)
    state = read_init(cfg)
    with tempfile.TemporaryDirectory() as tmp:  # timm's file loader adapts sizes; give it safetensors
        f = Path(tmp) / "init.safetensors"
        save_file({k: v.float().contiguous() for k, v in state.items()}, str(f))
        model = timm.create_model(m.backbone, pretrained=True, pretrained_cfg_overlay=dict(file=str(f)), **kw)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    head = {k for k in own if k.startswith(("head.", "fc_norm."))}
    missing = sorted(set(own) - set(state) - head)
    if unexpected or missing:
        raise ConfigError(f"model.init {m.init}: does not fit timm '{m.backbone}' (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}); was it exported from another architecture?")
    return model


def param_groups(model: nn.Module, cfg: FinetuneConfig, lr: float) -> list[dict]:
    """Layer-wise LR decay groups; each group's lr is lr x its layer scale (the schedule multiplies it)."""
    from timm.optim import param_groups_layer_decay

    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_layer_decay(model, cfg.optim.weight_decay, no_weight_decay_list=nwd,
                                      layer_decay=cfg.optim.layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


class ClassificationTask(FinetuneTask):
    """Single-label (data.train_dir) or multi-label (data.train_list) classification."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.multilabel = self.cfg.resolved_task == "multilabel"
        self.metric = "val/mAP" if self.multilabel else "val/top1"  # the one "best" follows
        self.mixup = None

    def describe(self) -> str:
        return f"{self.num_classes} classes ({'multi-label, mAP' if self.multilabel else 'single-label, top-1'})"

    def build_loaders(self):
        """Train and val loaders; sets self.num_classes and self.classes."""
        from hvpmtl.data.loaders.imagefolder import build_imagefolder_loader
        from hvpmtl.data.loaders.multilabel import build_multilabel_loader, class_names

        cfg = self.cfg
        d, o, size = cfg.data, cfg.optim, cfg.model.img_size
        common = dict(device=d.device, num_threads=d.num_threads, local_rank=self.local_rank, dtype=self.input_dtype,
                      rank=self.rank, world_size=self.world)
        if self.multilabel:
            classes = class_names(d.dictionary, cfg.model.num_classes)  # the config check: one of them is set
            self.num_classes = len(classes)
            lists = dict(num_classes=self.num_classes, batch_size=o.micro_batch_size, img_size=size,
                         label_threshold=d.label_threshold, skip_corrupt=d.skip_corrupt, skip_list=d.skip_list,
                         allow_outside_root=d.allow_outside_root,
                         log=self.log, **common)
            self.loader = build_multilabel_loader(d.train_list, d.root, train=True, seed=d.seed, **lists)
            self.val_loader = build_multilabel_loader(d.val_list, d.root, train=False, **lists)
            self.classes = classes
            return
        self.loader = build_imagefolder_loader(d.train_dir, o.micro_batch_size, size, train=True, seed=d.seed,
                                                     **common)
        self.val_loader = build_imagefolder_loader(d.val_dir, o.micro_batch_size, size, train=False, **common)
        classes = self.loader.classes
        if self.val_loader.classes != classes:
            raise ConfigError(f"data.val_dir {d.val_dir}: class folders differ from data.train_dir {d.train_dir}")
        self.num_classes = cfg.model.num_classes or len(classes)
        if self.num_classes < len(classes):
            raise ConfigError(f"model.num_classes={self.num_classes} but {d.train_dir} has {len(classes)} classes")
        self.classes = classes

    def build_model(self) -> nn.Module:
        d = self.cfg.data
        if d.mixup > 0 or d.cutmix > 0:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob,
                               switch_prob=d.mixup_switch_prob, mode="batch", label_smoothing=d.label_smoothing,
                               num_classes=self.num_classes)
        return build_model(self.cfg, self.num_classes)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        return param_groups(model, self.cfg, lr)

    def loss(self, engine, batch) -> tuple[torch.Tensor, dict]:
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["labels" if self.multilabel else "label"].to(self.device, non_blocking=True)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return self._loss(engine(x), y), {}

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.multilabel:  # target [B, C]: confidences in [0, 1] (or multi-hot)
            return F.binary_cross_entropy_with_logits(logits, target)
        if target.ndim == 2:  # mixup/cutmix soft targets (label smoothing included)
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.cfg.data.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_multilabel(model) if self.multilabel else self.evaluate_single_label(model)

    @torch.no_grad()
    def evaluate_multilabel(self, model: nn.Module) -> dict[str, float]:
        """mAP (percent; over the classes with a positive, label > 0, in the val list) and mean binary
        cross-entropy over every validation image, the same numbers on every rank. The loss adds up over ranks,
        AP does not: each rank gathers from all ranks the scores of its own share of the classes (r, r+W, ...),
        so no rank holds more than N x C/W of them (a 125k-image, 9.6k-class val set is 4.8 GB of scores)."""
        was_training = model.training
        model.eval()
        scores, labels = [], []
        try:
            for batch in self.val_loader:
                scores.append(model(batch["image"].to(self.device, self.input_dtype)).float())
                labels.append(batch["labels"].to(self.device).float())
        finally:
            model.train(was_training)
        empty = torch.zeros(0, self.num_classes, device=self.device)
        logits, target = (torch.cat(scores), torch.cat(labels)) if scores else (empty, empty)
        ap_sum, ap_count = 0.0, 0
        for r in range(self.world):
            cols = torch.arange(r, self.num_classes, self.world, device=self.device)
            part = all_gather_rows(torch.cat([logits[:, cols], target[:, cols]], dim=1), self.world)
            if r == self.rank:
                part = part.cpu().numpy()  # float32: average_precision widens one column at a time
                aps = [average_precision(part[:, j], part[:, len(cols) + j]) for j in range(len(cols))]
                aps = [a for a in aps if not math.isnan(a)]  # no positive of this class in the val list
                ap_sum, ap_count = sum(aps), len(aps)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        images, loss_sum, ap_sum, ap_count = sum_to_host(torch.tensor(
            [len(target), loss.item(), ap_sum, ap_count], dtype=torch.float64, device=self.device))
        if ap_count == 0:
            raise DataError(f"data.val_list {self.cfg.data.val_list}: no class has a positive label; mAP is undefined")
        return {"val/mAP": 100 * ap_sum / ap_count, "val/loss": loss_sum / max(1.0, images * self.num_classes),
                "val/images": images}

    @torch.no_grad()
    def evaluate_single_label(self, model: nn.Module) -> dict[str, float]:
        """top-1 / top-5 (percent) and mean cross-entropy over every validation image, all ranks summed."""
        was_training = model.training
        model.eval()
        k = min(5, self.num_classes)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # n, top1, top5, loss
        try:
            for batch in self.val_loader:
                x = batch["image"].to(self.device, self.input_dtype)
                y = batch["label"].to(self.device)
                logits = model(x).float()
                topk = logits.topk(k, dim=1).indices
                sums[0] += y.numel()
                sums[1] += (topk[:, 0] == y).sum()
                sums[2] += (topk == y[:, None]).any(dim=1).sum()
                sums[3] += F.cross_entropy(logits, y, reduction="sum")
        finally:
            model.train(was_training)
        images, top1, topk, loss = sum_to_host(sums)
        n = max(1.0, images)
        return {"val/top1": 100 * top1 / n, f"val/top{k}": 100 * topk / n, "val/loss": loss / n, "val/images": images}
