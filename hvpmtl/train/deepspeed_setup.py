"""What DeepSpeed is given: the precision (run.precision; auto: bf16 on a GPU, fp32 on the CPU), the DeepSpeed
config (run.ds_config's JSON with the batch sizes, clipping and precision of the experiment config), and, on a
machine without CUDA, DeepSpeed's CPU accelerator."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hvpmtl.config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(cfg) -> str:
    if cfg.run.precision != "auto":
        return cfg.run.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def build_ds_config(cfg, global_batch: int, precision: str) -> dict:
    """run.ds_config's JSON with what the experiment config sets: the batch sizes (global_batch: what
    check_batch_sizes returned, having filled in optim.grad_accum_steps), gradient clipping, the precision."""
    path = Path(cfg.run.ds_config)
    if not path.is_absolute() and not path.exists():  # the shipped ds_configs/, from any working directory
        path = Path(__file__).resolve().parents[2] / path
    try:
        ds = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"run.ds_config: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"run.ds_config: {path} is not valid JSON: {e}") from None
    ds.pop("_comment", None)
    o = cfg.optim
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: '{key}' is set from the experiment config (optim.*); remove it from the JSON")
    ds["train_batch_size"] = global_batch
    ds["train_micro_batch_size_per_gpu"] = o.micro_batch_size
    ds["gradient_accumulation_steps"] = o.grad_accum_steps
    ds["gradient_clipping"] = o.grad_clip
    # the JSON's other precision keys stay (bf16.check_grad_overflow: DeepSpeed skips a step on an inf gradient)
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": True, "initial_scale_power": 16} if precision == "fp16" else {"enabled": False}
    return ds


def prepare_deepspeed() -> None:
    """On a machine without CUDA: DeepSpeed's CPU accelerator, without its shared-memory all-reduce op
    (inference only, and a 60 s JIT build on first use)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):
        pass
