"""The fine-tuning schema: `FinetuneConfig` (task, model, data, optim, run, tracking) for classification,
multi-label, detection and segmentation, and its checks."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field

from hvpmtl.config.sections import (MAX_BATCH, MAX_CLASSES, MAX_EPOCHS, MAX_LR, MAX_SCALE, MAX_SEED, MAX_SIDE,
                                    MAX_STEPS, MAX_WIDTH, Float, OptimSection, PathStr, RunSection, Section,
                                    TrackingConfig, _check, _check_backbone, _check_optim)


class FTModelConfig(Section):
    backbone: str = "swin_base_patch4_window7_224"  # timm Swin or ViT name
    img_size: int = Field(224, ge=1, le=MAX_SIDE)
    num_classes: int = Field(0, ge=0, le=MAX_CLASSES)  # 0 = the class folders under data.train_dir, or data.dictionary's classes
    init: PathStr = ""  # exported backbone (hvpmtl export: timm safetensors, mmdet .pth, detectron2 .pth/.pkl)
    random_init: bool = False  # true: no init file (the from-scratch baseline)
    drop_path_rate: Float = Field(0.1, ge=0, lt=1)
    global_pool: Literal["avg", "token"] = "avg"  # avg: mean of the last feature map, as pre-training
    # dense tasks: the neck and heads on the backbone's four levels (hvpmtl/models/pyramid.py)
    fpn_channels: int = Field(256, ge=8, le=MAX_WIDTH)  # detection: FPN width
    rpn_proposals: int = Field(1000, ge=1, le=100_000)  # detection: RPN proposals kept per image (torchvision: 1000)
    roi_samples: int = Field(512, ge=1, le=100_000)  # detection: RoIs sampled per image for the box head's loss
    decoder_channels: int = Field(512, ge=8, le=MAX_WIDTH)  # segmentation: UperNet width
    aux_head: bool = True  # segmentation: mmseg's auxiliary FCN head on stride 16 (loss weight aux_weight)
    aux_weight: Float = Field(0.4, ge=0, le=10)


TASKS = ("classification", "multilabel", "detection", "segmentation")
TASK_FORMATS = {"classification": "imagefolder", "multilabel": "lists", "detection": "coco", "segmentation": "ade20k"}


class FTDataConfig(Section):
    # the layout of the task's data (one per task, TASK_FORMATS); "" = the task's own
    format: Literal["", "imagefolder", "lists", "coco", "ade20k"] = ""
    # single-label: ImageFolder roots <train_dir>/<class>/<image>; or multi-label: list files in the
    # pre-training's format (path idx:conf ...) under `root`, scored by mAP (hvpmtl/data/loaders/multilabel.py)
    train_dir: PathStr = ""
    val_dir: PathStr = ""
    train_list: PathStr = ""
    val_list: PathStr = ""
    root: PathStr = ""  # image root the list files' paths are relative to
    dictionary: PathStr = ""  # class names of the lists (optional; gives model.num_classes when that is 0)
    label_threshold: Optional[Float] = Field(None, gt=0, le=1)  # lists: None = confidences as soft targets, else multi-hot conf >= t
    skip_corrupt: bool = False  # lists: leave bad samples out (counted, reported) instead of refusing the list
    skip_list: PathStr = ""  # lists: `hvpmtl data validate --write-skip-list` output (keyed by list file and line)
    allow_outside_root: bool = False  # lists: read paths that resolve outside `root` through a symlink
    # detection (COCO layout): an instances JSON and an image folder per split; classes from its categories
    train_ann: PathStr = ""
    train_images: PathStr = ""
    val_ann: PathStr = ""
    val_images: PathStr = ""
    min_sizes: list[int] = Field(default_factory=lambda: list(range(480, 801, 32)))  # training short side, drawn
    max_size: int = Field(1333, ge=32, le=8192)  # longest side after the resize
    test_size: int = Field(800, ge=32, le=8192)  # evaluation short side
    # segmentation (ADEChallengeData2016 layout under `root`): images/ and annotations/{training,validation}
    num_classes: int = Field(0, ge=0, le=65535)  # segmentation classes (ADE20K: 150); 0 = from model.num_classes
    crop_size: int = Field(512, ge=32, le=8192)  # training crops (and the sliding window)
    scale_range: list[Float] = Field(default_factory=lambda: [0.5, 2.0])  # random rescale of base_size
    base_size: list[int] = Field(default_factory=lambda: [2048, 512])  # (long, short) sides before the ratio
    test_mode: Literal["whole", "slide"] = "whole"  # evaluation: whole image, or overlapping crop_size windows
    slide_stride: int = Field(341, ge=1, le=8192)  # sliding-window stride
    num_threads: int = Field(4, ge=1, le=1024)
    device: Literal["auto", "gpu", "cpu"] = "auto"  # where DALI runs
    label_smoothing: Float = Field(0.1, ge=0, lt=1)
    mixup: Float = Field(0.8, ge=0, le=MAX_SCALE)  # mixup alpha; 0 = off
    cutmix: Float = Field(1.0, ge=0, le=MAX_SCALE)  # cutmix alpha; 0 = off
    mixup_prob: Float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: Float = Field(0.5, ge=0, le=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class FTOptimConfig(OptimSection):
    epochs: int = Field(100, ge=1, le=MAX_EPOCHS)
    micro_batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    lr: Float = Field(1.25e-3, le=MAX_LR)
    # the linear scaling rule, off at 0: with N > 0, optim.lr is the peak at global batch N and the run's peak is
    # optim.lr x global batch / N (SimMIM: 1.25e-3 at 512), so a recipe keeps its LR on any number of GPUs
    lr_scale_batch: int = Field(0, ge=0, le=MAX_BATCH * 256)
    warmup_epochs: Float = Field(20.0, ge=0, le=MAX_EPOCHS)
    warmup_lr: Float = Field(2.5e-7, ge=0, le=MAX_LR)
    min_lr: Float = Field(2.5e-7, ge=0, le=MAX_LR)
    layer_decay: Float = Field(0.9, gt=0, le=1)  # SimMIM: 0.9 for Swin-B, 0.65 for ViT-B; 1.0 = off
    max_steps: int = Field(0, ge=0, le=100_000_000)  # > 0: the run (and its schedule) ends at this step
    schedule: Literal["cosine", "poly", "step"] = "cosine"  # after the warm-up: cosine to min_lr, poly, or steps
    poly_power: Float = Field(1.0, gt=0, le=10)
    # "step": lr x decay_rate at each (Mask R-CNN 1x: 8, 11)
    decay_epochs: list[Annotated[Float, Field(ge=0, le=MAX_EPOCHS)]] = Field(default_factory=list)
    decay_rate: Float = Field(0.1, gt=0, le=1)


class FTRunConfig(RunSection):
    name: str = "finetune"
    output_dir: PathStr = "runs/finetune"
    log_every: int = Field(50, ge=1, le=MAX_STEPS)
    keep_checkpoints: int = Field(2, ge=1, le=10_000)
    checkpoint_every_epochs: int = Field(1, ge=1, le=MAX_EPOCHS)


class FinetuneConfig(Section):
    task: Literal["", "classification", "multilabel", "detection", "segmentation"] = ""  # "": from the data keys
    model: FTModelConfig = Field(default_factory=FTModelConfig)
    data: FTDataConfig = Field(default_factory=FTDataConfig)
    optim: FTOptimConfig = Field(default_factory=FTOptimConfig)
    run: FTRunConfig = Field(default_factory=FTRunConfig)
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="hvpmtl-finetune"))

    @property
    def resolved_task(self) -> str:
        """The task: `task`, else what the data keys say (list files: multilabel, else classification)."""
        if self.task:
            return self.task
        if self.data.format:
            return {v: k for k, v in TASK_FORMATS.items()}[self.data.format]
        return "multilabel" if (self.data.train_list or self.data.val_list) else "classification"

    def check(self, source: str) -> None:
        m, d, o = self.model, self.data, self.optim
        _check_backbone(m.backbone, source)
        _check(bool(m.init) != m.random_init, source, "model.init",
               "give an exported backbone file, or set model.random_init: true (not both)")
        task = self.resolved_task
        _check(not d.format or d.format == TASK_FORMATS[task], source, "data.format",
               f"task '{task}' reads data.format '{TASK_FORMATS[task]}', got '{d.format}'")
        _check(o.schedule != "step" or bool(o.decay_epochs), source, "optim.decay_epochs",
               "must list the epochs of the lr drops with optim.schedule: step")
        if task in ("detection", "segmentation"):
            self._check_dense(task, source)
            _check_optim(o, source)
            return
        folders, lists = bool(d.train_dir or d.val_dir), bool(d.train_list or d.val_list)
        _check(folders != lists, source, "data.train_dir",
               "give ImageFolder roots (data.train_dir, data.val_dir; single-label) or list files (data.train_list, "
               "data.val_list; multi-label), not both" if folders else
               "nothing to fine-tune on: set data.train_dir and data.val_dir (ImageFolder roots; single-label) "
               "or data.train_list and data.val_list (list files; multi-label)")
        _check(bool(d.train_dir) == bool(d.val_dir), source, "data.val_dir" if d.train_dir else "data.train_dir",
               "data.train_dir and data.val_dir must both be set (ImageFolder roots)")
        _check(bool(d.train_list) == bool(d.val_list), source, "data.val_list" if d.train_list else "data.train_list",
               "data.train_list and data.val_list must both be set (multi-label list files)")
        _check(not lists or m.num_classes > 0 or bool(d.dictionary), source, "model.num_classes",
               "must be set for list files (or give data.dictionary)")
        _check(not lists or (d.mixup == 0 and d.cutmix == 0), source, "data.mixup",
               "mixup/cutmix are for single-label fine-tuning: set data.mixup and data.cutmix to 0 with list files")
        _check(not (d.mixup > 0 or d.cutmix > 0) or o.micro_batch_size % 2 == 0, source, "optim.micro_batch_size",
               "must be even with mixup/cutmix (timm mixes each sample with its mirror in the batch)")
        _check_optim(o, source)

    def _check_dense(self, task: str, source: str) -> None:
        d = self.data
        other = [k for k in ("train_dir", "val_dir", "train_list", "val_list") if getattr(d, k)]
        _check(not other, source, f"data.{other[0] if other else ''}", f"is not read by task '{task}'")
        _check(d.mixup == 0 and d.cutmix == 0, source, "data.mixup",
               f"mixup/cutmix are for single-label classification: set data.mixup and data.cutmix to 0 for {task}")
        if task == "detection":
            for k in ("train_ann", "train_images", "val_ann", "val_images"):
                _check(bool(getattr(d, k)), source, f"data.{k}",
                       "must be set for detection (COCO layout: an instances JSON and an image folder per split)")
            _check(len(d.min_sizes) > 0 and all(32 <= v <= d.max_size for v in d.min_sizes), source,
                   "data.min_sizes", f"must be short sides in [32, data.max_size ({d.max_size})], got {d.min_sizes}")
            return
        _check(bool(d.root), source, "data.root",
               "must be set for segmentation (the folder holding images/ and annotations/)")
        _check(d.num_classes > 0 or self.model.num_classes > 0, source, "data.num_classes",
               "must be set for segmentation (ADE20K: 150)")
        _check(len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1] <= 8, source, "data.scale_range",
               f"must be [lo, hi] with 0 < lo <= hi <= 8, got {d.scale_range}")
        _check(len(d.base_size) == 2 and all(32 <= v <= 8192 for v in d.base_size), source, "data.base_size",
               f"must be [long, short] sides in [32, 8192], got {d.base_size}")
