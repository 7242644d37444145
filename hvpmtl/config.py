"""Configuration of both trainers: pydantic models, YAML with `base:` inheritance, `--set` overrides.

`ExperimentConfig` (pre-training) and `FinetuneConfig` share their `run`, `optim` and `tracking`
sections (`RunSection`, `OptimSection`, `TrackingConfig`) and one loader, `load_config(path, overrides,
schema=...)`. Every key is typed and every number bounded; pydantic checks types and bounds, the
schema's `check` the rules that tie keys together. A config is validated in the launcher before any
worker starts, so a typo costs seconds, not a queued 64-GPU allocation. Errors name the file and the
dotted key; a renamed key (RENAMED) is refused with its new name. `save_config` writes the paths of the
run's data absolute, so the saved copy works from any directory.
"""
from __future__ import annotations

import json
import math
import os
import reprlib
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config problem, with the key and the file it came from."""


def _yaml_number(value: Any) -> Any:
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


Float = Annotated[float, BeforeValidator(_yaml_number)]
PATH = "path"  # marks a field holding a file or folder: save_config writes it absolute
PathStr = Annotated[str, PATH]


# Upper bounds of every number (issue 23.6): generous for any real run, small enough that nothing overflows
# downstream (timedelta, thread waits, numpy seeds) or allocates beyond reason.
WEEK_S = 7 * 24 * 3600  # any timeout or wait
MAX_STEPS = 10**9  # any count of steps
MAX_EPOCHS = 10**5
MAX_SIDE = 8192  # px, any image or patch side (the fine-tuning sizes' bound)
MAX_BATCH = 2**16  # per rank; a global batch or a queue: MAX_BATCH x 256
MAX_CLASSES = 2**20
MAX_WIDTH = 2**16  # a layer's width, or a count of prototypes
MAX_SEED = 2**31 - 1  # numpy takes seeds < 2**32, with room for the per-rank offset (seed + 1000 x rank + 1)
MAX_LR = 10.0
MAX_SCALE = 1e4  # a loss weight, a focusing exponent, a mixing alpha, a clip norm


class Section(BaseModel):
    """Strict types (no "3" for 3, no 1 for true), unknown keys refused, no NaN/inf."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- sections of both trainers


class RunSection(Section):
    name: str = "hvpmtl"
    output_dir: PathStr = "runs/hvpmtl"
    ds_config: str = "ds_configs/zero2.json"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = Field(0, ge=0, le=MAX_SEED)
    log_every: int = Field(10, ge=1, le=MAX_STEPS)  # steps between printed lines (and grad-norm reads)
    keep_checkpoints: int = Field(3, ge=1, le=10_000)
    collective_timeout_s: int = Field(600, ge=1, le=WEEK_S)
    progress_bar: bool = True
    max_nonfinite_in_row: int = Field(10, ge=1, le=MAX_STEPS)  # skipped micro-batches/steps in a row before the policy
    # what max_nonfinite_in_row non-finite losses or skipped steps in a row do: rollback (reload the last good
    # checkpoint, skip the window of batches, go on: a spike costs a long run minutes, not the job) | stop (exit 4)
    on_nonfinite: Literal["rollback", "stop"] = "rollback"
    max_rollbacks: int = Field(3, ge=0, le=MAX_STEPS)  # rollbacks in the run (kept in its checkpoints) before exit 4
    rollback_skip_batches: int = Field(0, ge=0, le=MAX_STEPS)  # micro-batches skipped beyond the offending window
    rollback_lr_scale: Float = Field(1.0, gt=0, le=1)  # LR multiplier after a rollback (1: unchanged) ...
    rollback_lr_steps: int = Field(0, ge=0, le=MAX_STEPS)  # ... for this many optimizer steps
    peak_tflops: Float = Field(0.0, ge=0, le=1e6)  # per device, for perf/mfu; 0: a known GPU's, or measured on CPU


class OptimSection(Section):
    epochs: int = Field(30, ge=1, le=MAX_EPOCHS)
    micro_batch_size: int = Field(16, ge=1, le=MAX_BATCH)  # per rank
    grad_accum_steps: Optional[int] = Field(None, ge=1, le=MAX_BATCH)  # null: global_batch_size / (micro x world), else 1
    global_batch_size: int = Field(0, ge=0, le=MAX_BATCH * 256)  # 0 = micro x accum x world; else checked against that product
    lr: Float = Field(1e-4, le=MAX_LR)  # the peak learning rate (reached after the warm-up); > 0: _check_optim
    min_lr: Float = Field(1e-7, ge=0, le=MAX_LR)
    warmup_epochs: Float = Field(5.0, ge=0, le=MAX_EPOCHS)
    weight_decay: Float = Field(0.05, ge=0, le=MAX_LR)
    betas: list[Float] = Field(default_factory=lambda: [0.9, 0.999])
    grad_clip: Float = Field(5.0, ge=0, le=MAX_SCALE)  # 0 = off


# the stores MLflow can track to (a driver may follow a "+": postgresql+psycopg2); "" is a local path
TRACKING_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str, where: str = "tracking.tracking_uri") -> str:
    """A typo in the scheme (`htp://`) is a config error at start, whatever tracking.on_unreachable says: no
    server will ever answer it."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        raise ValueError(f"{where}: '{scheme}://' is not a tracking store MLflow knows "
                         f"({', '.join(s + '://' for s in TRACKING_SCHEMES if s)}, or a folder)")
    return uri


class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: Annotated[str, AfterValidator(check_tracking_uri)] = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/../mlflow.db
    experiment: str = "hvpmtl"
    # MLflow unreachable at start: continue (train; the run is created and caught up when it answers) | fail (exit 2)
    on_unreachable: Literal["continue", "fail"] = "continue"
    check_timeout_s: Float = Field(15.0, gt=0, le=WEEK_S)  # the start-up check (connect + get/create the experiment)
    request_timeout_s: int = Field(10, ge=1, le=WEEK_S)  # one MLflow HTTP request (MLflow's default: 120)
    request_retries: int = Field(1, ge=0, le=1000)  # MLflow's retries of one request (its default: 7); the sender's are endless
    close_timeout_s: Float = Field(60.0, gt=0, le=WEEK_S)  # at the end, how long to wait for MLflow to take the last metrics


# ----------------------------------------------------------------------------- pre-training

PRETRAIN_FORMATS = ("tencent", "synthetic", "shards", "tensors")  # what hvpmtl.data serves for pre-training


class ModelConfig(Section):
    backbone: str = "swin_tiny_patch4_window7_224"  # any timm Swin or ViT name
    img_size: int = Field(224, ge=1, le=MAX_SIDE)
    drop_path_rate: Float = Field(0.1, ge=0, lt=1)
    grad_checkpointing: bool = False
    # Query2Label decoder
    decoder_dim: int = Field(768, ge=1, le=MAX_WIDTH)
    decoder_layers: int = Field(2, ge=1, le=1000)
    decoder_heads: int = Field(8, ge=1, le=MAX_WIDTH)
    decoder_ffn_dim: int = Field(2048, ge=1, le=MAX_WIDTH)
    decoder_self_attn: bool = False  # off: self-attention over 11,166 queries costs O(C^2)
    decoder_groups: int = Field(0, ge=0, le=MAX_CLASSES)  # 0: one query per class (Query2Label); G > 0: G group queries (ML-Decoder)
    decoder_dropout: Float = Field(0.1, ge=0, lt=1)
    # SwAV head
    proto_hidden_dim: int = Field(2048, ge=1, le=MAX_WIDTH)
    proto_out_dim: int = Field(128, ge=1, le=MAX_WIDTH)
    num_prototypes: int = Field(3000, ge=1, le=MAX_WIDTH)
    # layernorm: Linear-LayerNorm-GELU-Linear | batchnorm: SwAV's Linear-BatchNorm-ReLU-Linear, statistics of the
    # global batch (docs/DESIGN.md, "SwAV off the uniform point")
    proto_head_norm: Literal["layernorm", "batchnorm"] = "layernorm"


class DataConfig(Section):
    # tencent / synthetic (list files), shards, tensors (random tensors, for benchmarks and exactness tests)
    format: Literal[PRETRAIN_FORMATS] = "tencent"
    root: PathStr = ""  # image root the list file's paths are relative to
    list_file: PathStr = ""  # Tencent ML-Images list file (path idx:conf ...)
    dictionary: PathStr = ""  # Tencent dictionary file (class names, parents)
    shards: PathStr = ""  # folder of webdataset .tar shards (+ .idx)
    num_classes: int = Field(11166, ge=1, le=MAX_CLASSES)
    img_size: int = Field(224, ge=1, le=MAX_SIDE)
    num_threads: int = Field(4, ge=1, le=1024)
    device: Literal["auto", "gpu", "cpu"] = "auto"  # where DALI runs (auto = GPU when CUDA is there)
    crop_scale: list[Float] = Field(default_factory=lambda: [0.2, 1.0])
    flip: bool = True
    color_jitter: Float = Field(0.4, ge=0, le=1)
    rotation_deg: Float = Field(10.0, ge=0, le=180)
    rand_augment_n: int = Field(2, ge=0, le=16)  # 0 turns RandAugment off
    rand_augment_m: int = Field(9, ge=0, le=30)  # DALI's 31 magnitude bins
    mask_patch_size: int = Field(32, ge=1, le=MAX_SIDE)
    mask_ratio: Float = 0.6  # in (0, 1): the schema's check
    label_threshold: Optional[Float] = None  # None: confidences as soft targets; else multi-hot conf >= t
    skip_corrupt: bool = False
    skip_list: PathStr = ""
    allow_outside_root: bool = False  # read list paths that resolve outside `root` through a symlink (a link farm)
    holdout_list: PathStr = ""  # labelled held-out split for online evaluation
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # the data index (`hvpmtl data index`): "" = beside the source, <list_file or shards>.hvpidx
    index: PathStr = ""
    index_auto_build: int = Field(1_000_000, ge=0, le=MAX_STEPS)  # a missing/stale index of at most this many samples is built at start-up; 0 = never
    index_wait_s: int = Field(600, ge=1, le=WEEK_S)  # how long ranks wait for the one process that builds it
    max_pixels: int = Field(67_108_864, ge=0, le=2**32)  # width x height (JPEG header) above which an image is an error; 0 = no bound
    # issue 22, shards in a bucket (data.shards: s3://bucket/prefix): node-local copies of the shard metadata and,
    # under cache_limit_gb (0 = no tar cache), of the tars read; "" = metadata in ~/.cache/hvpmtl/s3, no tar cache
    cache_dir: PathStr = ""
    cache_limit_gb: Float = Field(0.0, ge=0, le=1e6)


class ASLConfig(Section):
    enabled: bool = True
    weight: Float = Field(0.001, ge=0, le=MAX_SCALE)
    eta: Float = Field(10.0, gt=0, le=MAX_SCALE)  # weight of the positive term (paper)
    gamma_pos: Float = Field(4.0, ge=0, le=MAX_SCALE)
    gamma_neg: Float = Field(1.0, ge=0, le=MAX_SCALE)
    clip: Float = Field(0.0, ge=0, lt=1)  # probability margin for negatives (ASL's m); 0 = off
    eps: Float = Field(1e-8, gt=0, lt=1)


class SwAVConfig(Section):
    enabled: bool = True
    weight: Float = Field(0.02, ge=0, le=MAX_SCALE)
    temperature: Float = Field(0.1, gt=0, le=MAX_SCALE)
    epsilon: Float = Field(0.05, gt=0, le=MAX_SCALE)
    sinkhorn_iters: int = Field(3, ge=1, le=10_000)
    t_max: Optional[Float] = Field(10.0, gt=0, le=MAX_SCALE)  # clamp of score/epsilon; None = SwAV's unclamped codes
    queue_length: int = Field(0, ge=0, le=MAX_BATCH * 256)  # 0 = no queue; else a multiple of the global batch
    queue_start_step: int = Field(0, ge=0, le=MAX_STEPS)
    freeze_prototypes_steps: int = Field(0, ge=0, le=MAX_STEPS)
    # masked: SwAV reads the masked view 1 (no extra forward) | unmasked: one more forward of the whole view 1
    view1: Literal["masked", "unmasked"] = "masked"


class MIMConfig(Section):
    enabled: bool = True
    weight: Float = Field(1.0, ge=0, le=MAX_SCALE)


class DistillConfig(Section):
    enabled: bool = True
    weight: Float = Field(10.0, ge=0, le=MAX_SCALE)
    temperature: Float = Field(0.1, gt=0, le=MAX_SCALE)
    momentum: Float = Field(0.995, ge=0, lt=1)
    momentum_schedule: Literal["constant", "cosine"] = "constant"  # cosine: to momentum_end
    momentum_end: Float = Field(1.0, ge=0, le=1)


class ObjectivesConfig(Section):
    asl: ASLConfig = Field(default_factory=ASLConfig)
    swav: SwAVConfig = Field(default_factory=SwAVConfig)
    mim: MIMConfig = Field(default_factory=MIMConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


class OptimConfig(OptimSection):
    max_steps: int = Field(0, ge=0, le=MAX_STEPS)  # > 0 caps the run (demos, smoke tests)
    steps_per_epoch: int = Field(0, ge=0, le=MAX_STEPS)  # 0 = derived from the data set size and the global batch


class RunConfig(RunSection):
    checkpoint_every: int = Field(1000, ge=1, le=MAX_STEPS)  # steps
    eval_every: int = Field(0, ge=0, le=MAX_STEPS)  # steps between online linear-probe/kNN evaluations; 0 = off
    image_log_every: int = Field(0, ge=0, le=MAX_STEPS)  # steps between MLflow image panels; 0 = off
    compile: bool = False  # torch.compile the backbones (student and teacher) and the label decoder
    collapse_warn_steps: int = Field(50, ge=0, le=MAX_STEPS)  # warn when a collapse figure stays collapsed this many steps; 0 = off


class ExperimentConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objectives: ObjectivesConfig = Field(default_factory=ObjectivesConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def check(self, source: str) -> None:
        """Values that type-check but cannot work together."""
        m, d, o, r, ob = self.model, self.data, self.optim, self.run, self.objectives
        _check_backbone(m.backbone, source)
        _check(m.img_size % d.mask_patch_size == 0, source, "model.img_size",
               f"must be a positive multiple of data.mask_patch_size ({d.mask_patch_size}), got {m.img_size}")
        _check(d.img_size == m.img_size, source, "data.img_size",
               f"must equal model.img_size ({m.img_size}), got {d.img_size}")
        _check(m.decoder_dim % m.decoder_heads == 0, source, "model.decoder_heads",
               f"must divide model.decoder_dim ({m.decoder_dim}), got {m.decoder_heads}")
        _check(m.decoder_groups <= d.num_classes, source, "model.decoder_groups",
               f"must be in [0, data.num_classes ({d.num_classes})], got {m.decoder_groups}")
        _check(0.0 < d.mask_ratio < 1.0, source, "data.mask_ratio", f"must be in (0, 1), got {d.mask_ratio}")
        _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, source, "data.crop_scale",
               f"must be [lo, hi] with 0 < lo <= hi <= 1, got {d.crop_scale}")
        _check(d.label_threshold is None or 0 < d.label_threshold <= 1, source, "data.label_threshold",
               "must be in (0, 1] or null")
        _check(any(x.enabled for x in (ob.asl, ob.swav, ob.mim, ob.distill)), source, "objectives",
               "at least one objective must be enabled")
        dm = ob.distill
        _check(dm.momentum_schedule == "constant" or dm.momentum_end >= dm.momentum, source,
               "objectives.distill.momentum_end", f"must be >= objectives.distill.momentum ({dm.momentum})")
        _check_optim(o, source)  # optim.lr > 0 first
        _check(o.min_lr <= o.lr, source, "optim.min_lr", f"must be in [0, optim.lr], got {o.min_lr}")
        _check(r.eval_every == 0 or bool(d.holdout_list), source, "run.eval_every",
               "> 0 needs data.holdout_list (a labelled held-out list file; "
               "`hvpmtl data make-synthetic --holdout N` writes one)")


# ----------------------------------------------------------------------------- fine-tuning


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


# ----------------------------------------------------------------------------- checks shared by both


def _check(cond: bool, source: str, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: '{key}' {msg}")


def _check_backbone(name: str, source: str) -> None:
    _check(name.startswith(("swin_", "vit_")), source, "model.backbone",
           f"must be a timm Swin or ViT name (swin_*, vit_*), got '{name}'")


def _check_optim(o: OptimSection, source: str) -> None:
    _check(o.lr > 0 and math.isfinite(o.lr), source, "optim.lr", f"must be a positive number, got {o.lr}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), source, "optim.betas",
           f"must be [b1, b2] in [0, 1), got {o.betas}")
    _check(o.warmup_epochs <= o.epochs, source, "optim.warmup_epochs",
           f"must be <= optim.epochs ({o.epochs}), got {o.warmup_epochs}")


def check_batch_sizes(cfg, world_size: int) -> int:
    """Global batch = micro x accumulation x world size. Fills in optim.grad_accum_steps when it is null
    (derived from optim.global_batch_size, else 1), lowering optim.micro_batch_size to the ranks' share when that
    is smaller (no accumulation unless the global batch needs it); a message naming the keys when the sizes do
    not fit."""
    o = cfg.optim
    # optim.micro_batch_size is the most a rank takes (what fits its GPU); when the ranks' share of the global
    # batch is smaller, each takes that share with no accumulation (64 GPUs x 16 = 1024)
    if (o.grad_accum_steps is None and o.global_batch_size and o.micro_batch_size * world_size > o.global_batch_size
            and o.global_batch_size % world_size == 0):
        o.micro_batch_size = o.global_batch_size // world_size
    per_step = o.micro_batch_size * world_size
    if o.grad_accum_steps is None:
        if o.global_batch_size and o.global_batch_size % per_step:
            raise ConfigError(
                f"optim.global_batch_size={o.global_batch_size} is not a multiple of micro_batch_size "
                f"({o.micro_batch_size}) x world size ({world_size}) = {per_step}, so no "
                f"optim.grad_accum_steps fits; change optim.micro_batch_size or the number of ranks")
        o.grad_accum_steps = o.global_batch_size // per_step if o.global_batch_size else 1
    product = per_step * o.grad_accum_steps
    if o.global_batch_size and o.global_batch_size != product:
        raise ConfigError(
            f"optim.global_batch_size={o.global_batch_size} but micro_batch_size ({o.micro_batch_size}) x "
            f"grad_accum_steps ({o.grad_accum_steps}) x world size ({world_size}) = {product}; "
            f"set optim.grad_accum_steps={o.global_batch_size // per_step} "
            f"(or leave it out to derive it) or change the batch sizes")
    swav = getattr(getattr(cfg, "objectives", None), "swav", None)
    if swav is not None and swav.enabled and swav.queue_length % product:
        raise ConfigError(f"objectives.swav.queue_length={swav.queue_length} must be a multiple of the global batch "
                          f"({product}): each rank keeps queue_length / world size rows, pushed a micro-batch at a time")
    return product


# ----------------------------------------------------------------------------- loading

# What a config may be: far above any real one (a few KB, 4 levels, ~200 values), far below what hurts a launch
# (issue 23.6: an alias bomb, 20,000 nested brackets). Each is refused as a ConfigError naming where.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32  # nested mappings/lists, aliases followed
MAX_VALUES = 10_000  # values once aliases are expanded (what pydantic and the messages walk)
MAX_BASES = 16  # files in one `base:` chain
MAX_ERRORS = 10  # validation errors listed; the rest counted
SHOWN = 200  # characters of a value or an override a message shows

_short_repr = reprlib.Repr()  # reprlib stops at a few items / characters: no message prints a huge value
_short_repr.maxlevel, _short_repr.maxlist, _short_repr.maxdict = 3, 6, 6
_short_repr.maxstring = _short_repr.maxother = SHOWN
_short_repr.maxlong = 40
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _shown(value: Any) -> str:
    """repr of a value for a message, at most about SHOWN characters."""
    text = _short_repr.repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def _shown_text(text: str) -> str:
    """At most SHOWN characters of a text; what UTF-8 cannot hold (argv's undecodable bytes) escaped."""
    short = text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"
    return short.encode("utf-8", "backslashreplace").decode("utf-8")


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that stops at MAX_DEPTH while composing (PyYAML's composer recurses: 20,000 brackets would be a
    RecursionError) and names the scalar its constructors fail on with a ValueError (a 5,000-digit int, a 30th of
    February) instead of letting that escape."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as e:  # not YAMLErrors: PyYAML lets them through
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_shown(node.value)} as {node.tag.rsplit(':', 1)[-1]}: {_shown_text(str(e))}",
                node.start_mark) from None


def _check_tree(root: yaml.Node, key_lines: dict) -> None:
    """Refuse, before anything is constructed, what construction, pydantic or a message would expand without bound:
    an alias inside the value it names, nesting beyond MAX_DEPTH or more than MAX_VALUES values with aliases
    followed (PyYAML shares an aliased object, its consumers copy it: a 571-byte file was 6.5 GB). Also refuse a
    key given twice in one mapping (one of the two would be silently dropped) and strings UTF-8 cannot hold (an
    escaped lone surrogate, NUL). Records the line of each key in `key_lines` for messages."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height) once walked
    walking: set[int] = set()

    def refuse(node, path, problem):
        where = f"'{_shown_text(_key(path))}': " if path else ""
        raise yaml.composer.ComposerError(None, None, where + problem, node.start_mark)

    def walk(node, depth: int, path: tuple) -> tuple[int, int]:
        if id(node) in done:  # an alias: its values count again wherever it is used
            size, height = done[id(node)]
            if depth + height - 1 > MAX_DEPTH:
                refuse(node, path, f"nested deeper than {MAX_DEPTH} levels with aliases followed")
            return size, height
        if id(node) in walking:
            refuse(node, path, "an alias refers to a value that contains it")
        if depth > MAX_DEPTH:
            refuse(node, path, f"nested deeper than {MAX_DEPTH} levels with aliases followed")
        walking.add(id(node))
        size, height = 1, 1
        if isinstance(node, yaml.ScalarNode):
            if "\x00" in node.value or not node.value.isascii() and not _utf8(node.value):
                refuse(node, path, "a string with a NUL or an unpaired surrogate (from an escape) cannot be used")
        else:
            pairs = node.value if isinstance(node, yaml.MappingNode) else enumerate(node.value)
            seen: dict = {}
            for k, v in pairs:
                if isinstance(node, yaml.MappingNode):
                    name = k.value if isinstance(k, yaml.ScalarNode) else None
                    if name is not None and k.tag != _MERGE_TAG:
                        if (k.tag, name) in seen:
                            refuse(k, path, f"key '{_shown_text(name)}' is given twice (also on line "
                                            f"{seen[k.tag, name]}); one of the two would be ignored")
                        seen[k.tag, name] = k.start_mark.line + 1
                        key_lines.setdefault((*path, name), k.start_mark.line + 1)
                    ks, kh = walk(k, depth + 1, path)
                    size, height = size + ks, max(height, kh + 1)
                    child = (*path, name) if name is not None and k.tag != _MERGE_TAG else path
                else:
                    child = (*path, k)
                vs, vh = walk(v, depth + 1, child)
                size, height = size + vs, max(height, vh + 1)
                if size > MAX_VALUES:
                    refuse(v, child, f"more than {MAX_VALUES} values with aliases expanded")
        walking.discard(id(node))
        done[id(node)] = (size, height)
        return size, height

    walk(root, 1, ())


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _parse_yaml(text: str) -> tuple[Any, dict]:
    """YAML text -> (value, {key path: line}); yaml.YAMLError for anything refused."""
    loader = _ConfigLoader(text)
    key_lines: dict = {}
    try:
        node = loader.get_single_node()
        if node is None:
            return None, key_lines
        _check_tree(node, key_lines)
        return loader.construct_document(node), key_lines
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError, text: str) -> tuple[int, int, str]:
    """(line, column, what is wrong) of a YAML error, both 1-based."""
    if isinstance(e, yaml.reader.ReaderError):
        pos = e.position
        line, col = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        return line, col, f"character {char}: {e.reason}"
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "cannot be read"
        if e.context and e.problem and e.context_mark is not None:
            problem += f" ({e.context}, from line {e.context_mark.line + 1} column {e.context_mark.column + 1})"
        if mark is not None:
            return mark.line + 1, mark.column + 1, _shown_text(problem)
        return 1, 1, _shown_text(problem)
    return 1, 1, _shown_text(str(e))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _key_paths(d: dict, prefix: tuple = ()):
    """Every key path of a nested dict, sections included."""
    for k, v in d.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _key_paths(v, (*prefix, k))


def parse_override(text: str) -> dict:
    """`optim.lr=2e-4` -> {'optim': {'lr': 0.0002}}; the value is parsed as YAML (with the same bounds as a
    file). A value YAML cannot read is refused, naming the override and how to quote it as a string."""
    shown = _shown_text(text)
    if "=" not in text:
        raise ConfigError(f"--set '{shown}': expected KEY=VALUE, e.g. optim.lr=2e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.isidentifier() for p in parts):
        raise ConfigError(f"--set '{shown}': KEY must be dotted names like optim.lr, got '{_shown_text(key)}'")
    try:
        value = _parse_yaml(raw)[0] if raw != "" else ""
    except yaml.YAMLError as e:
        line, col, problem = _yaml_problem(e, raw)
        at = f"column {col}" if "\n" not in raw else f"line {line} column {col}"
        # json.dumps is a YAML double-quoted string; shlex makes it one shell word
        quoted = shlex.quote(f"{key.strip()}={json.dumps(raw, ensure_ascii=False)}")
        raise ConfigError(f"--set '{shown}': YAML cannot read the value ({problem}, {at}); to give it as a string, "
                          f"quote it: --set {_shown_text(quoted)}") from None
    out: dict = {}
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = (), origins: Optional[dict] = None) -> dict:
    """A config file (and its `base:` chain) as a dict; `origins` gets "FILE:LINE" for each key path."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path):], path))
        raise ConfigError(f"{chain[-1]}: 'base' makes a cycle: {cycle}")
    if len(chain) >= MAX_BASES:
        raise ConfigError(f"{chain[-1]}: 'base' chains more than {MAX_BASES} files ({chain[0]} -> ... -> {path})")
    try:
        with open(path, "rb") as f:  # bounded read: a config named /dev/zero or a 10 GB file is refused, not read
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        where = f"{chain[-1]}: 'base': " if chain else ""
        raise ConfigError(f"{where}cannot read config file {path}: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = raw.count(b"\n", 0, e.start) + 1, e.start - raw.rfind(b"\n", 0, e.start)
        raise ConfigError(f"{path}:{line}:{col}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          f"save the file as UTF-8") from None
    try:
        data, key_lines = _parse_yaml(text)
    except yaml.YAMLError as e:
        line, col, problem = _yaml_problem(e, text)
        raise ConfigError(f"{path}:{line}:{col}: not valid YAML: {problem}") from None
    if data is None:  # an empty file (or only comments)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    # `base: other.yaml` inherits (paths relative to this file), as the ablations do.
    base = data.pop("base", None)
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a file name, got {_shown(base)}")
        data = _merge(_read_yaml(path.parent / base, (*chain, path), origins), data)
    if origins is not None:
        origins.update({k: f"at {path}:{line}" for k, line in key_lines.items() if k != ("base",)})
    return data


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# old keys -> their new name and what to know: refused (an old config fails at load, naming the new key), never
# read silently under the new name when the meaning changed
RENAMED = {
    "optim.base_lr": "'optim.lr': the peak learning rate, as in pre-training (with optim.lr_scale_batch N > 0, the "
                     "peak at global batch N, scaled linearly to the run's; 0, the default: as is). Fine-tuning's "
                     "base_lr was always scaled, by global batch / optim.lr_scale_batch (512 when not given): for the "
                     "same LR, keep that rule (optim.lr: the old base_lr, optim.lr_scale_batch: the old one, 512 if "
                     "none was set) or give optim.lr the peak itself with optim.lr_scale_batch: 0",
}

_TYPE_WORDS = {"float": "a number", "int": "an integer", "bool": "true or false", "string": "a string",
               "list": "a list", "model": "a mapping", "dict": "a mapping"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _section_fields(schema, loc: tuple) -> list[str]:
    cls = schema
    for part in loc:
        ann = cls.model_fields[part].annotation
        cls = ann
    return sorted(cls.model_fields)


def _message(schema, err: dict) -> str:
    loc, kind, value = err["loc"], err["type"], err.get("input")
    key = _shown_text(_key(loc))
    if kind == "extra_forbidden" and key in RENAMED:
        return f"'{key}' was renamed {RENAMED[key]}"
    if kind == "extra_forbidden":
        return f"unknown key '{key}' (known: {', '.join(_section_fields(schema, loc[:-1]))})"
    if kind == "invalid_key":
        return f"key {_shown(loc[-1])} of '{_key(loc[:-1]) or 'the top level'}' must be a name (a string)"
    if kind in _BOUNDS:
        bound = next(iter(err["ctx"].values()))
        return f"'{key}' must be {_BOUNDS[kind]} {bound}, got {_shown(value)}"
    if kind == "literal_error":
        return f"'{key}' must be one of {err['ctx']['expected']}, got {_shown(value)}"
    if kind == "finite_number":
        return f"'{key}' must be a finite number, got {_shown(value)}"
    base = kind.split("_")[0]
    if base in _TYPE_WORDS and kind.endswith(("_type", "_parsing", "_from_float")):
        shown = type(value).__name__ if base in ("model", "dict") else _shown(value)
        return f"'{key}' must be {_TYPE_WORDS[base]}, got {shown}"
    return f"'{key}' {_shown_text(err['msg'])}"


def _origin(origins: dict, loc: tuple) -> str:
    """Where the value at `loc` was set: " (at FILE:LINE)" or " (from --set ...)", "" when unknown."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return f" ({origins[loc[:n]]})"
    return ""


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = (),
                schema=ExperimentConfig):
    """YAML file (or defaults) + `--set` overrides -> a checked `schema` instance (ExperimentConfig for
    pre-training, FinetuneConfig for fine-tuning). Anything wrong is a ConfigError naming the file (line,
    column) or the override, and the key."""
    values: dict = {}
    origins: dict = {}
    source = "<defaults>"
    if path is not None:
        values = _read_yaml(Path(path), origins=origins)
        source = str(path)
    for o in overrides:
        over = parse_override(o)
        values = _merge(values, over)
        origins.update({k: f"from --set {_shown_text(o)}" for k in _key_paths(over)})
    if overrides:
        source += " + --set " + " ".join(_shown_text(o) for o in overrides)
    try:
        cfg = schema.model_validate(values)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        lines = [f"{_message(schema, err)}{_origin(origins, err['loc'])}" for err in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            lines.append(f"... and {len(errors) - MAX_ERRORS} more errors")
        raise ConfigError(f"{source}: " + "\n  ".join(lines)) from None
    cfg.check(source)
    return cfg


# ----------------------------------------------------------------------------- writing


def to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump()


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def absolute_paths(cfg: BaseModel) -> dict:
    """cfg as a dict, with every non-empty path field (PathStr) made absolute against the working directory."""
    out = {}
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            out[name] = absolute_paths(value)
        elif PATH in field.metadata and value:
            out[name] = value if "://" in value else os.path.abspath(value)  # a bucket URI stays as it is
        else:
            out[name] = value.model_dump() if isinstance(value, BaseModel) else value
    return out


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """The config as loaded (after --set), data paths absolute: `load_config(path, schema=type(cfg))` reads it back
    from any working directory."""
    Path(path).write_text(yaml.safe_dump(absolute_paths(cfg), sort_keys=False))
