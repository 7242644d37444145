"""What both trainers' configs are built of: the bounded types, the upper bound of every number, `Section`, the
shared `run`, `optim` and `tracking` sections, the checks both schemas run and the batch sizes at a world size."""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from hvpmtl.config.errors import ConfigError


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
