"""The pre-training schema: `ExperimentConfig` (model, data, objectives, optim, run, tracking) and its checks."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from hvpmtl.config.sections import (MAX_BATCH, MAX_CLASSES, MAX_SCALE, MAX_SEED, MAX_SIDE, MAX_STEPS, MAX_WIDTH,
                                    WEEK_S, Float, OptimSection, PathStr, RunSection, Section, TrackingConfig, _check,
                                    _check_backbone, _check_optim)

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
    img_size: int = Field(224, ge=1, le=MAX_SIDE)  # in an ExperimentConfig, left out: model.img_size
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

    @model_validator(mode="after")
    def _data_img_size_from_model(self) -> ExperimentConfig:
        """data.img_size, which must equal model.img_size (`check`), is model.img_size when not given."""
        if "img_size" not in self.data.model_fields_set:
            self.data.img_size = self.model.img_size
        return self

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
