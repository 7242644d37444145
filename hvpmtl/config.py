"""Configuration of both trainers: pydantic models, YAML with `base:` inheritance, `--set` overrides.

`ExperimentConfig` (pre-training) and `FinetuneConfig` share their `run`, `optim` and `tracking`
sections (`RunSection`, `OptimSection`, `TrackingConfig`) and one loader, `load_config(path, overrides,
schema=...)`. Every key is typed and every number bounded; pydantic checks types and bounds, the
schema's `check` the rules that tie keys together. A config is validated in the launcher before any
worker starts, so a typo costs seconds, not a queued 64-GPU allocation. Errors name the file and the
dotted key. `save_config` writes the paths of the run's data absolute, so the saved copy works from
any directory.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


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


class Section(BaseModel):
    """Strict types (no "3" for 3, no 1 for true), unknown keys refused, no NaN/inf."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- sections of both trainers


class RunSection(Section):
    name: str = "hvpmtl"
    output_dir: PathStr = "runs/hvpmtl"
    ds_config: str = "ds_configs/zero2.json"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)  # steps between printed lines (and grad-norm reads)
    keep_checkpoints: int = Field(3, ge=1)
    collective_timeout_s: int = Field(600, ge=1)
    progress_bar: bool = True
    max_nonfinite_in_row: int = Field(10, ge=1)  # skipped micro-batches in a row before stopping (exit 4)


class OptimSection(Section):
    epochs: int = Field(30, ge=1)
    micro_batch_size: int = Field(16, ge=1)  # per rank
    grad_accum_steps: Optional[int] = Field(None, ge=1)  # null: global_batch_size / (micro x world), else 1
    global_batch_size: int = Field(0, ge=0)  # 0 = micro x accum x world; else checked against that product
    min_lr: Float = Field(1e-7, ge=0)
    warmup_epochs: Float = Field(5.0, ge=0)
    weight_decay: Float = Field(0.05, ge=0)
    betas: list[Float] = Field(default_factory=lambda: [0.9, 0.999])
    grad_clip: Float = Field(5.0, ge=0)  # 0 = off


class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/../mlflow.db
    experiment: str = "hvpmtl"
    # MLflow unreachable at start: continue (train; the run is created and caught up when it answers) | fail (exit 2)
    on_unreachable: Literal["continue", "fail"] = "continue"
    check_timeout_s: Float = Field(15.0, gt=0)  # the start-up check (connect + get/create the experiment)
    request_timeout_s: int = Field(10, ge=1)  # one MLflow HTTP request (MLflow's default: 120)
    request_retries: int = Field(1, ge=0)  # MLflow's retries of one request (its default: 7); the sender's are endless
    close_timeout_s: Float = Field(60.0, gt=0)  # at the end, how long to wait for MLflow to take the last metrics


# ----------------------------------------------------------------------------- pre-training

PRETRAIN_FORMATS = ("tencent", "synthetic", "shards", "tensors")  # what hvpmtl.data serves for pre-training


class ModelConfig(Section):
    backbone: str = "swin_tiny_patch4_window7_224"  # any timm Swin or ViT name
    img_size: int = Field(224, ge=1)
    drop_path_rate: Float = Field(0.1, ge=0, lt=1)
    grad_checkpointing: bool = False
    # Query2Label decoder
    decoder_dim: int = Field(768, ge=1)
    decoder_layers: int = Field(2, ge=1)
    decoder_heads: int = Field(8, ge=1)
    decoder_ffn_dim: int = Field(2048, ge=1)
    decoder_self_attn: bool = False  # off: self-attention over 11,166 queries costs O(C^2)
    decoder_groups: int = Field(0, ge=0)  # 0: one query per class (Query2Label); G > 0: G group queries (ML-Decoder)
    decoder_dropout: Float = Field(0.1, ge=0, lt=1)
    # SwAV head
    proto_hidden_dim: int = Field(2048, ge=1)
    proto_out_dim: int = Field(128, ge=1)
    num_prototypes: int = Field(3000, ge=1)
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
    num_classes: int = Field(11166, ge=1)
    img_size: int = Field(224, ge=1)
    num_threads: int = Field(4, ge=1, le=1024)
    device: Literal["auto", "gpu", "cpu"] = "auto"  # where DALI runs (auto = GPU when CUDA is there)
    crop_scale: list[Float] = Field(default_factory=lambda: [0.2, 1.0])
    flip: bool = True
    color_jitter: Float = Field(0.4, ge=0, le=1)
    rotation_deg: Float = Field(10.0, ge=0, le=180)
    rand_augment_n: int = Field(2, ge=0, le=16)  # 0 turns RandAugment off
    rand_augment_m: int = Field(9, ge=0, le=30)  # DALI's 31 magnitude bins
    mask_patch_size: int = Field(32, ge=1)
    mask_ratio: Float = 0.6
    label_threshold: Optional[Float] = None  # None: confidences as soft targets; else multi-hot conf >= t
    skip_corrupt: bool = False
    skip_list: PathStr = ""
    holdout_list: PathStr = ""  # labelled held-out split for online evaluation
    seed: int = Field(0, ge=0)
    # the data index (`hvpmtl data index`): "" = beside the source, <list_file or shards>.hvpidx
    index: PathStr = ""
    index_auto_build: int = Field(1_000_000, ge=0)  # a missing/stale index of at most this many samples is built at start-up; 0 = never
    index_wait_s: int = Field(600, ge=1)  # how long ranks wait for the one process that builds it
    max_pixels: int = Field(67_108_864, ge=0)  # width x height (JPEG header) above which an image is an error; 0 = no bound


class ASLConfig(Section):
    enabled: bool = True
    weight: Float = Field(0.001, ge=0)
    eta: Float = Field(10.0, gt=0)  # weight of the positive term (paper)
    gamma_pos: Float = Field(4.0, ge=0)
    gamma_neg: Float = Field(1.0, ge=0)
    clip: Float = Field(0.0, ge=0, lt=1)  # probability margin for negatives (ASL's m); 0 = off
    eps: Float = Field(1e-8, gt=0, lt=1)


class SwAVConfig(Section):
    enabled: bool = True
    weight: Float = Field(0.02, ge=0)
    temperature: Float = Field(0.1, gt=0)
    epsilon: Float = Field(0.05, gt=0)
    sinkhorn_iters: int = Field(3, ge=1)
    t_max: Optional[Float] = Field(10.0, gt=0)  # clamp of score/epsilon; None = SwAV's unclamped codes
    queue_length: int = Field(0, ge=0)  # 0 = no queue; else a multiple of the global batch
    queue_start_step: int = Field(0, ge=0)
    freeze_prototypes_steps: int = Field(0, ge=0)
    # masked: SwAV reads the masked view 1 (no extra forward) | unmasked: one more forward of the whole view 1
    view1: Literal["masked", "unmasked"] = "masked"


class MIMConfig(Section):
    enabled: bool = True
    weight: Float = Field(1.0, ge=0)


class DistillConfig(Section):
    enabled: bool = True
    weight: Float = Field(10.0, ge=0)
    temperature: Float = Field(0.1, gt=0)
    momentum: Float = Field(0.995, ge=0, lt=1)
    momentum_schedule: Literal["constant", "cosine"] = "constant"  # cosine: to momentum_end
    momentum_end: Float = Field(1.0, ge=0, le=1)


class ObjectivesConfig(Section):
    asl: ASLConfig = Field(default_factory=ASLConfig)
    swav: SwAVConfig = Field(default_factory=SwAVConfig)
    mim: MIMConfig = Field(default_factory=MIMConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


class OptimConfig(OptimSection):
    max_steps: int = Field(0, ge=0)  # > 0 caps the run (demos, smoke tests)
    lr: Float = 1e-4
    steps_per_epoch: int = Field(0, ge=0)  # 0 = derived from the data set size and the global batch


class RunConfig(RunSection):
    checkpoint_every: int = Field(1000, ge=1)  # steps
    eval_every: int = Field(0, ge=0)  # steps between online linear-probe/kNN evaluations; 0 = off
    image_log_every: int = Field(0, ge=0)  # steps between MLflow image panels; 0 = off
    compile: bool = False  # torch.compile the backbones (student and teacher) and the label decoder
    collapse_warn_steps: int = Field(50, ge=0)  # warn when a collapse figure stays collapsed this many steps; 0 = off


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
        _check(o.lr > 0 and math.isfinite(o.lr), source, "optim.lr", f"must be a positive number, got {o.lr}")
        _check(o.min_lr <= o.lr, source, "optim.min_lr", f"must be in [0, optim.lr], got {o.min_lr}")
        _check_optim(o, source)
        _check(r.eval_every == 0 or bool(d.holdout_list), source, "run.eval_every",
               "> 0 needs data.holdout_list (a labelled held-out list file; "
               "`hvpmtl data make-synthetic --holdout N` writes one)")


# ----------------------------------------------------------------------------- fine-tuning


class FTModelConfig(Section):
    backbone: str = "swin_base_patch4_window7_224"  # timm Swin or ViT name
    img_size: int = Field(224, ge=1)
    num_classes: int = Field(0, ge=0)  # 0 = the class folders under data.train_dir, or data.dictionary's classes
    init: PathStr = ""  # exported backbone (hvpmtl export: timm safetensors, mmdet .pth, detectron2 .pth/.pkl)
    random_init: bool = False  # true: no init file (the from-scratch baseline)
    drop_path_rate: Float = Field(0.1, ge=0, lt=1)
    global_pool: Literal["avg", "token"] = "avg"  # avg: mean of the last feature map, as pre-training


class FTDataConfig(Section):
    # single-label: ImageFolder roots <train_dir>/<class>/<image>; or multi-label: list files in the
    # pre-training's format (path idx:conf ...) under `root`, scored by mAP (hvpmtl/data/multilabel.py)
    train_dir: PathStr = ""
    val_dir: PathStr = ""
    train_list: PathStr = ""
    val_list: PathStr = ""
    root: PathStr = ""  # image root the list files' paths are relative to
    dictionary: PathStr = ""  # class names of the lists (optional; gives model.num_classes when that is 0)
    label_threshold: Optional[Float] = None  # lists: None = confidences as soft targets, else multi-hot conf >= t
    skip_corrupt: bool = False  # lists: leave bad samples out (counted, reported) instead of refusing the list
    skip_list: PathStr = ""  # lists: `hvpmtl data validate --write-skip-list` output (keyed by list file and line)
    num_threads: int = Field(4, ge=1, le=1024)
    device: Literal["auto", "gpu", "cpu"] = "auto"  # where DALI runs
    label_smoothing: Float = Field(0.1, ge=0, lt=1)
    mixup: Float = Field(0.8, ge=0)  # mixup alpha; 0 = off
    cutmix: Float = Field(1.0, ge=0)  # cutmix alpha; 0 = off
    mixup_prob: Float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: Float = Field(0.5, ge=0, le=1)
    seed: int = Field(0, ge=0)


class FTOptimConfig(OptimSection):
    epochs: int = Field(100, ge=1)
    micro_batch_size: int = Field(128, ge=1)
    base_lr: Float = Field(1.25e-3, gt=0)  # SimMIM's BASE_LR: peak lr = base_lr * global batch / lr_scale_batch
    lr_scale_batch: int = Field(512, ge=1)
    warmup_epochs: Float = Field(20.0, ge=0)
    warmup_lr: Float = Field(2.5e-7, ge=0)
    min_lr: Float = Field(2.5e-7, ge=0)
    layer_decay: Float = Field(0.9, gt=0, le=1)  # SimMIM: 0.9 for Swin-B, 0.65 for ViT-B; 1.0 = off


class FTRunConfig(RunSection):
    name: str = "finetune"
    output_dir: PathStr = "runs/finetune"
    log_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_every_epochs: int = Field(1, ge=1)


class FinetuneConfig(Section):
    model: FTModelConfig = Field(default_factory=FTModelConfig)
    data: FTDataConfig = Field(default_factory=FTDataConfig)
    optim: FTOptimConfig = Field(default_factory=FTOptimConfig)
    run: FTRunConfig = Field(default_factory=FTRunConfig)
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="hvpmtl-finetune"))

    def check(self, source: str) -> None:
        m, d, o = self.model, self.data, self.optim
        _check_backbone(m.backbone, source)
        _check(bool(m.init) != m.random_init, source, "model.init",
               "give an exported backbone file, or set model.random_init: true (not both)")
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


# ----------------------------------------------------------------------------- checks shared by both


def _check(cond: bool, source: str, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: '{key}' {msg}")


def _check_backbone(name: str, source: str) -> None:
    _check(name.startswith(("swin_", "vit_")), source, "model.backbone",
           f"must be a timm Swin or ViT name (swin_*, vit_*), got '{name}'")


def _check_optim(o: OptimSection, source: str) -> None:
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), source, "optim.betas",
           f"must be [b1, b2] in [0, 1), got {o.betas}")
    _check(o.warmup_epochs <= o.epochs, source, "optim.warmup_epochs",
           f"must be <= optim.epochs ({o.epochs}), got {o.warmup_epochs}")


def check_batch_sizes(cfg, world_size: int) -> int:
    """Global batch = micro x accumulation x world size. Fills in optim.grad_accum_steps when it is null
    (derived from optim.global_batch_size, else 1); a message naming the keys when the sizes do not fit."""
    o = cfg.optim
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


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """`optim.lr=2e-4` -> {'optim': {'lr': 0.0002}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected KEY=VALUE, e.g. optim.lr=2e-4")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path):], path))
        raise ConfigError(f"{chain[-1]}: 'base' makes a cycle: {cycle}")
    try:
        text = path.read_text()
    except OSError as e:
        where = f"{chain[-1]}: 'base': " if chain else ""
        raise ConfigError(f"{where}cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    # `base: other.yaml` inherits (paths relative to this file), as the ablations do.
    base = data.pop("base", None)
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
        data = _merge(_read_yaml(path.parent / base, (*chain, path)), data)
    return data


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


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
    key = _key(loc)
    if kind == "extra_forbidden":
        return f"unknown key '{key}' (known: {', '.join(_section_fields(schema, loc[:-1]))})"
    if kind in _BOUNDS:
        bound = next(iter(err["ctx"].values()))
        return f"'{key}' must be {_BOUNDS[kind]} {bound}, got {value!r}"
    if kind == "literal_error":
        return f"'{key}' must be one of {err['ctx']['expected']}, got {value!r}"
    if kind == "finite_number":
        return f"'{key}' must be a finite number, got {value!r}"
    base = kind.split("_")[0]
    if base in _TYPE_WORDS and kind.endswith(("_type", "_parsing", "_from_float")):
        shown = type(value).__name__ if base in ("model", "dict") else repr(value)
        return f"'{key}' must be {_TYPE_WORDS[base]}, got {shown}"
    return f"'{key}' {err['msg']}"


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = (),
                schema=ExperimentConfig):
    """YAML file (or defaults) + `--set` overrides -> a checked `schema` instance (ExperimentConfig for
    pre-training, FinetuneConfig for fine-tuning)."""
    values: dict = {}
    source = "<defaults>"
    if path is not None:
        values = _read_yaml(Path(path))
        source = str(path)
    for o in overrides:
        values = _merge(values, parse_override(o))
    if overrides:
        source += " + --set " + " ".join(overrides)
    try:
        cfg = schema.model_validate(values)
    except ValidationError as e:
        raise ConfigError("\n".join(f"{source}: {_message(schema, err)}" for err in e.errors())) from None
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
            out[name] = os.path.abspath(value)
        else:
            out[name] = value.model_dump() if isinstance(value, BaseModel) else value
    return out


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """The config as loaded (after --set), data paths absolute: `load_config(path, schema=type(cfg))` reads it back
    from any working directory."""
    Path(path).write_text(yaml.safe_dump(absolute_paths(cfg), sort_keys=False))
