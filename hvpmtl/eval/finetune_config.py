"""Fine-tuning configuration: typed dataclasses loaded like the pre-training config (YAML, `base:`,
`--set KEY=VALUE`, errors naming the file and the dotted key).

The `optim` and `run` field names that DeepSpeed's config needs (micro_batch_size, grad_accum_steps,
global_batch_size, grad_clip, run.ds_config, run.precision) match the pre-training config, so the
engine's `build_ds_config` and `Tracker` serve both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from hvpmtl.config import ConfigError, TrackingConfig, _check, load_config, to_dict


@dataclass
class FTModelConfig:
    backbone: str = "swin_base_patch4_window7_224"  # timm Swin or ViT name
    img_size: int = 224
    num_classes: int = 0  # 0 = the number of class folders under data.train_dir
    init: str = ""  # exported backbone (hvpmtl export: timm safetensors, mmdet .pth, detectron2 .pth/.pkl)
    random_init: bool = False  # true: no init file (the from-scratch baseline)
    drop_path_rate: float = 0.1
    global_pool: str = "avg"  # mean of the last feature map, as pre-training and SimMIM's ViT fine-tuning


@dataclass
class FTDataConfig:
    train_dir: str = ""  # ImageFolder root: <train_dir>/<class>/<image>
    val_dir: str = ""
    num_threads: int = 4
    device: str = "auto"  # auto | gpu | cpu: where DALI runs
    label_smoothing: float = 0.1
    mixup: float = 0.8  # mixup alpha; 0 = off
    cutmix: float = 1.0  # cutmix alpha; 0 = off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    seed: int = 0


@dataclass
class FTOptimConfig:
    epochs: int = 100
    micro_batch_size: int = 128  # per rank
    grad_accum_steps: int = 1
    global_batch_size: int = 0  # 0 = micro x accum x world; else checked against that product
    base_lr: float = 1.25e-3  # SimMIM's BASE_LR: peak lr = base_lr * global batch / lr_scale_batch
    lr_scale_batch: int = 512
    warmup_epochs: float = 20.0
    warmup_lr: float = 2.5e-7
    min_lr: float = 2.5e-7
    weight_decay: float = 0.05
    layer_decay: float = 0.9  # SimMIM: 0.9 for Swin-B, 0.65 for ViT-B; 1.0 = off
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 5.0


@dataclass
class FTRunConfig:
    name: str = "finetune"
    output_dir: str = "runs/finetune"
    ds_config: str = "ds_configs/zero2.json"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    seed: int = 0
    log_every: int = 50  # steps
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 2
    collective_timeout_s: int = 600
    progress_bar: bool = True


@dataclass
class FinetuneConfig:
    model: FTModelConfig = field(default_factory=FTModelConfig)
    data: FTDataConfig = field(default_factory=FTDataConfig)
    optim: FTOptimConfig = field(default_factory=FTOptimConfig)
    run: FTRunConfig = field(default_factory=FTRunConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="hvpmtl-finetune"))


def load_finetune_config(path: Optional[str | Path] = None, overrides=()) -> FinetuneConfig:
    return load_config(path, overrides, schema=FinetuneConfig, validator=validate_finetune)


def validate_finetune(cfg: FinetuneConfig, source: str = "<config>") -> None:
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    _check(m.backbone.startswith(("swin_", "vit_")), source, "model.backbone",
           f"must be a timm Swin or ViT name (swin_*, vit_*), got '{m.backbone}'")
    _check(m.img_size > 0, source, "model.img_size", "must be > 0")
    _check(m.num_classes >= 0, source, "model.num_classes", "must be >= 0 (0 = from the class folders)")
    _check(bool(m.init) != m.random_init, source, "model.init",
           "give an exported backbone file, or set model.random_init: true (not both)")
    _check(m.global_pool in ("avg", "token"), source, "model.global_pool", "must be avg or token")
    _check(bool(d.train_dir) and bool(d.val_dir), source, "data.train_dir",
           "data.train_dir and data.val_dir must both be set (ImageFolder roots)")
    _check(d.device in ("auto", "gpu", "cpu"), source, "data.device", f"must be auto, gpu or cpu, got '{d.device}'")
    _check(d.num_threads > 0, source, "data.num_threads", "must be > 0")
    _check(0 <= d.label_smoothing < 1, source, "data.label_smoothing", "must be in [0, 1)")
    _check(d.mixup >= 0 and d.cutmix >= 0, source, "data.mixup", "mixup and cutmix alphas must be >= 0")
    _check(o.epochs > 0, source, "optim.epochs", "must be > 0")
    _check(o.micro_batch_size > 0, source, "optim.micro_batch_size", "must be > 0")
    _check(not (d.mixup > 0 or d.cutmix > 0) or o.micro_batch_size % 2 == 0, source, "optim.micro_batch_size",
           "must be even with mixup/cutmix (timm mixes each sample with its mirror in the batch)")
    _check(o.grad_accum_steps > 0, source, "optim.grad_accum_steps", "must be > 0")
    _check(o.base_lr > 0 and o.lr_scale_batch > 0, source, "optim.base_lr", "base_lr and lr_scale_batch must be > 0")
    _check(0 <= o.min_lr and 0 <= o.warmup_lr, source, "optim.min_lr", "min_lr and warmup_lr must be >= 0")
    _check(o.warmup_epochs >= 0, source, "optim.warmup_epochs", "must be >= 0")
    _check(o.weight_decay >= 0, source, "optim.weight_decay", "must be >= 0")
    _check(0 < o.layer_decay <= 1, source, "optim.layer_decay", "must be in (0, 1]")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), source, "optim.betas", "must be [b1, b2] in [0, 1)")
    _check(o.grad_clip >= 0, source, "optim.grad_clip", "must be >= 0 (0 = off)")
    _check(r.precision in ("auto", "bf16", "fp16", "fp32"), source, "run.precision",
           f"must be auto, bf16, fp16 or fp32, got '{r.precision}'")
    _check(r.checkpoint_every_epochs > 0, source, "run.checkpoint_every_epochs", "must be > 0")
    _check(r.keep_checkpoints >= 1, source, "run.keep_checkpoints", "must be >= 1")
    _check(r.log_every > 0, source, "run.log_every", "must be > 0")


def save_finetune_config(cfg: FinetuneConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["FinetuneConfig", "load_finetune_config", "validate_finetune", "save_finetune_config", "ConfigError"]
