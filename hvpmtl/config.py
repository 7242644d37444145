"""Experiment configuration: typed dataclasses, YAML loading, `--set` overrides, validation.

Everything a run needs is in one `ExperimentConfig`. It is validated in the launcher before
DeepSpeed starts any worker, so a typo costs seconds, not a queued 64-GPU allocation.
Errors name the file and the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config problem, with the key and the file it came from."""


@dataclass
class ModelConfig:
    backbone: str = "swin_tiny_patch4_window7_224"  # any timm Swin or ViT name
    img_size: int = 224
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    # Query2Label decoder
    decoder_dim: int = 768
    decoder_layers: int = 2
    decoder_heads: int = 8
    decoder_ffn_dim: int = 2048
    decoder_self_attn: bool = False  # off: self-attention over 11,166 queries costs O(C^2)
    decoder_groups: int = 0  # 0: one query per class (Query2Label); G > 0: G group queries (ML-Decoder)
    decoder_dropout: float = 0.1
    # SwAV head
    proto_hidden_dim: int = 2048
    proto_out_dim: int = 128
    num_prototypes: int = 3000
    proto_head_norm: str = "layernorm"  # layernorm | batchnorm (SwAV's head; statistics of the global batch)


@dataclass
class DataConfig:
    format: str = "tencent"  # tencent | shards | imagefolder | tensors (random tensors, for benchmarks and exactness tests)
    root: str = ""  # image root the list file's paths are relative to
    list_file: str = ""  # Tencent ML-Images list file (path idx:conf ...)
    dictionary: str = ""  # Tencent dictionary file (class names, parents)
    shards: str = ""  # folder of webdataset .tar shards (+ .idx)
    num_classes: int = 11166
    img_size: int = 224
    num_threads: int = 4
    device: str = "auto"  # auto | gpu | cpu: where DALI runs (auto = GPU when CUDA is there)
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])
    flip: bool = True
    color_jitter: float = 0.4
    rotation_deg: float = 10.0
    rand_augment_n: int = 2  # 0 turns RandAugment off
    rand_augment_m: int = 9
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    label_threshold: Optional[float] = None  # None: confidences as soft targets; else multi-hot conf >= t
    skip_corrupt: bool = False
    skip_list: str = ""
    holdout_list: str = ""  # labelled held-out split for online evaluation
    seed: int = 0


@dataclass
class ASLConfig:
    enabled: bool = True
    weight: float = 0.001
    eta: float = 10.0  # weight of the positive term (paper)
    gamma_pos: float = 4.0
    gamma_neg: float = 1.0
    clip: float = 0.0  # probability margin for negatives (ASL's m); 0 = off
    eps: float = 1e-8


@dataclass
class SwAVConfig:
    enabled: bool = True
    weight: float = 0.02
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    t_max: Optional[float] = 10.0  # clamp of score/epsilon; None = SwAV's unclamped codes
    queue_length: int = 0  # 0 = no queue; else a multiple of the global batch
    queue_start_step: int = 0
    freeze_prototypes_steps: int = 0
    view1: str = "masked"  # masked: SwAV reads the masked view 1 (no extra forward) | unmasked: one more forward


@dataclass
class MIMConfig:
    enabled: bool = True
    weight: float = 1.0


@dataclass
class DistillConfig:
    enabled: bool = True
    weight: float = 10.0
    temperature: float = 0.1
    momentum: float = 0.995
    momentum_schedule: str = "constant"  # constant | cosine (to momentum_end)
    momentum_end: float = 1.0


@dataclass
class ObjectivesConfig:
    asl: ASLConfig = field(default_factory=ASLConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    mim: MIMConfig = field(default_factory=MIMConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class OptimConfig:
    epochs: int = 30
    max_steps: int = 0  # > 0 caps the run (demos, smoke tests)
    micro_batch_size: int = 16  # per rank
    grad_accum_steps: int = 1
    global_batch_size: int = 0  # 0 = micro x accum x world; else checked against that product
    lr: float = 1e-4
    min_lr: float = 1e-7
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 5.0
    steps_per_epoch: int = 0  # 0 = derived from the data set size and the global batch


@dataclass
class RunConfig:
    name: str = "hvpmtl"
    output_dir: str = "runs/hvpmtl"
    ds_config: str = "ds_configs/zero2.json"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 3
    max_nonfinite_in_row: int = 10
    collective_timeout_s: int = 600
    eval_every: int = 0  # steps between online linear-probe/kNN evaluations; 0 = off
    image_log_every: int = 0  # steps between MLflow image panels; 0 = off
    progress_bar: bool = True
    compile: bool = False  # torch.compile the backbones (student and teacher) and the label decoder
    collapse_warn_steps: int = 50  # warn when a collapse figure stays collapsed this many steps; 0 = off


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/../mlflow.db
    experiment: str = "hvpmtl"


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, source: str):
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, source)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return value
    return value


def _build(cls, values: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{source}: unknown key '{where}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in values.items():
        where = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(v, hints[k], where, source)
    return cls(**kwargs)


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


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    # `base: other.yaml` inherits (paths relative to this file), as the ablations do.
    base = data.pop("base", None)
    if base:
        data = _merge(_read_yaml((path.parent / base).resolve()), data)
    return data


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = (),
                schema=ExperimentConfig, validator=None):
    """YAML file (or defaults) + `--set` overrides -> a validated `schema` instance (ExperimentConfig unless
    another dataclass tree is given, e.g. the fine-tuning config, with its own validator)."""
    validator = validator or (validate if schema is ExperimentConfig else None)
    values: dict = {}
    source = "<defaults>"
    if path is not None:
        values = _read_yaml(Path(path))
        source = str(path)
    for o in overrides:
        values = _merge(values, parse_override(o))
    if overrides:
        source += " + --set " + " ".join(overrides)
    cfg = _build(schema, values, "", source)
    if validator is not None:
        validator(cfg, source)
    return cfg


def _check(cond: bool, source: str, key: str, msg: str):
    if not cond:
        raise ConfigError(f"{source}: '{key}' {msg}")


def validate(cfg: ExperimentConfig, source: str = "<config>") -> None:
    """Values that type-check but cannot work."""
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    _check(m.backbone.startswith(("swin_", "vit_")), source, "model.backbone",
           f"must be a timm Swin or ViT name (swin_*, vit_*), got '{m.backbone}'")
    _check(m.img_size > 0 and m.img_size % d.mask_patch_size == 0, source, "model.img_size",
           f"must be a positive multiple of data.mask_patch_size ({d.mask_patch_size}), got {m.img_size}")
    _check(d.img_size == m.img_size, source, "data.img_size",
           f"must equal model.img_size ({m.img_size}), got {d.img_size}")
    _check(m.decoder_dim % m.decoder_heads == 0, source, "model.decoder_heads",
           f"must divide model.decoder_dim ({m.decoder_dim})")
    _check(0 <= m.decoder_groups <= d.num_classes, source, "model.decoder_groups",
           f"must be in [0, data.num_classes ({d.num_classes})], got {m.decoder_groups}")
    for k in ("decoder_layers", "decoder_dim", "num_prototypes", "proto_out_dim", "proto_hidden_dim"):
        _check(getattr(m, k) > 0, source, f"model.{k}", "must be > 0")
    _check(d.format in ("tencent", "shards", "imagefolder", "tensors"), source, "data.format",
           f"must be tencent, shards, imagefolder or tensors, got '{d.format}'")
    _check(d.device in ("auto", "gpu", "cpu"), source, "data.device", f"must be auto, gpu or cpu, got '{d.device}'")
    _check(d.num_classes > 0, source, "data.num_classes", "must be > 0")
    _check(0.0 < d.mask_ratio < 1.0, source, "data.mask_ratio", f"must be in (0, 1), got {d.mask_ratio}")
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, source, "data.crop_scale",
           f"must be [lo, hi] with 0 < lo <= hi <= 1, got {d.crop_scale}")
    _check(d.label_threshold is None or 0 < d.label_threshold <= 1, source, "data.label_threshold",
           "must be in (0, 1] or null")
    _check(d.num_threads > 0, source, "data.num_threads", "must be > 0")
    ob = cfg.objectives
    _check(any(x.enabled for x in (ob.asl, ob.swav, ob.mim, ob.distill)), source, "objectives",
           "at least one objective must be enabled")
    for name in ("asl", "swav", "mim", "distill"):
        _check(getattr(ob, name).weight >= 0, source, f"objectives.{name}.weight", "must be >= 0")
    _check(ob.asl.eta > 0, source, "objectives.asl.eta", "must be > 0")
    _check(ob.asl.gamma_pos >= 0 and ob.asl.gamma_neg >= 0, source, "objectives.asl.gamma_pos",
           "gammas must be >= 0")
    _check(0 <= ob.asl.clip < 1, source, "objectives.asl.clip", "must be in [0, 1)")
    _check(ob.swav.epsilon > 0, source, "objectives.swav.epsilon", "must be > 0")
    _check(ob.swav.temperature > 0, source, "objectives.swav.temperature", "must be > 0")
    _check(ob.swav.sinkhorn_iters >= 1, source, "objectives.swav.sinkhorn_iters", "must be >= 1")
    _check(ob.swav.t_max is None or ob.swav.t_max > 0, source, "objectives.swav.t_max", "must be > 0 or null")
    _check(ob.swav.queue_length >= 0, source, "objectives.swav.queue_length", "must be >= 0")
    _check(ob.swav.view1 in ("masked", "unmasked"), source, "objectives.swav.view1",
           f"must be masked or unmasked, got '{ob.swav.view1}'")
    _check(m.proto_head_norm in ("layernorm", "batchnorm"), source, "model.proto_head_norm",
           f"must be layernorm or batchnorm, got '{m.proto_head_norm}'")
    _check(r.collapse_warn_steps >= 0, source, "run.collapse_warn_steps", "must be >= 0 (0 = off)")
    _check(0 <= ob.distill.momentum < 1, source, "objectives.distill.momentum", "must be in [0, 1)")
    _check(ob.distill.momentum_schedule in ("constant", "cosine"), source, "objectives.distill.momentum_schedule",
           "must be constant or cosine")
    _check(ob.distill.temperature > 0, source, "objectives.distill.temperature", "must be > 0")
    _check(o.micro_batch_size > 0, source, "optim.micro_batch_size", "must be > 0")
    _check(o.grad_accum_steps > 0, source, "optim.grad_accum_steps", "must be > 0")
    _check(o.epochs > 0, source, "optim.epochs", "must be > 0")
    _check(o.max_steps >= 0, source, "optim.max_steps", "must be >= 0")
    _check(o.lr > 0 and math.isfinite(o.lr), source, "optim.lr", f"must be a positive number, got {o.lr}")
    _check(0 <= o.min_lr <= o.lr, source, "optim.min_lr", f"must be in [0, optim.lr], got {o.min_lr}")
    _check(o.warmup_epochs >= 0, source, "optim.warmup_epochs", "must be >= 0")
    _check(o.weight_decay >= 0, source, "optim.weight_decay", "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), source, "optim.betas", "must be [b1, b2] in [0, 1)")
    _check(o.grad_clip >= 0, source, "optim.grad_clip", "must be >= 0 (0 = off)")
    _check(r.precision in ("auto", "bf16", "fp16", "fp32"), source, "run.precision",
           f"must be auto, bf16, fp16 or fp32, got '{r.precision}'")
    _check(r.checkpoint_every > 0, source, "run.checkpoint_every", "must be > 0")
    _check(r.keep_checkpoints >= 1, source, "run.keep_checkpoints", "must be >= 1")
    _check(r.max_nonfinite_in_row >= 1, source, "run.max_nonfinite_in_row", "must be >= 1")


def check_batch_sizes(cfg: ExperimentConfig, world_size: int) -> int:
    """train_batch_size = micro x accumulation x world size; a clear message when it does not hold."""
    o = cfg.optim
    product = o.micro_batch_size * o.grad_accum_steps * world_size
    if o.global_batch_size and o.global_batch_size != product:
        raise ConfigError(
            f"optim.global_batch_size={o.global_batch_size} but micro_batch_size ({o.micro_batch_size}) x "
            f"grad_accum_steps ({o.grad_accum_steps}) x world size ({world_size}) = {product}; "
            f"set optim.grad_accum_steps={o.global_batch_size // max(1, o.micro_batch_size * world_size)} "
            f"or change the batch sizes")
    q = cfg.objectives.swav.queue_length
    if cfg.objectives.swav.enabled and q % product:
        raise ConfigError(f"objectives.swav.queue_length={q} must be a multiple of the global batch ({product}): "
                          f"each rank keeps queue_length / world size rows, pushed a micro-batch at a time")
    return product


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
