"""What a resumed run may change in its config, and the refusal of what it may not (issue 23).

A run resumed with another config either applies each change from the resumed step or refuses it, never
half-applies it. The config a checkpoint was trained with travels in each rank's state (`rank_state["config"]`,
read before the model is built; older checkpoints: the run's config.yaml), and the diff is taken key by key on
the flattened configs with paths made absolute.

Refused (FIXED): what the weights, the optimizer's shapes or the data order depend on: the model (except
dropout, drop-path and gradient checkpointing), the training data's source, class count, image and mask size,
data.seed, which objectives exist and SwAV's queue, the precision (other checkpoint files), the fine-tuning task.
Everything else applies from the resumed step: the LR and its schedule (rebuilt at the step: runtime.Trainer
overrides the scheduler state DeepSpeed restores), batch sizes (the data position is global), weight decay and
betas, epochs and max_steps, evaluation and checkpoint cadence, augmentation, the skip policy (the loader maps
its position by sample id: hvpmtl/data/loaders/order.py), logging and tracking.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from hvpmtl.config import ConfigError, flatten

# keys (or prefixes ending in '.') a resume cannot change
FIXED = ("model.", "task", "data.format", "data.seed", "data.list_file", "data.shards", "data.dictionary",
         "data.num_classes", "data.img_size", "data.mask_patch_size", "data.train_list", "data.train_dir",
         "data.train_ann", "data.train_images", "data.crop_size", "objectives.asl.enabled",
         "objectives.swav.enabled", "objectives.mim.enabled", "objectives.distill.enabled",
         "objectives.swav.queue_length", "run.precision")
# model keys that change no weight shape
CHANGEABLE = ("model.drop_path_rate", "model.grad_checkpointing", "model.decoder_dropout")
WHY = {"model.": "the model's architecture and weights", "task": "the heads and the loss",
       "data.seed": "the data order", "data.format": "the data set", "data.list_file": "the data set",
       "data.shards": "the data set", "data.train_list": "the data set", "data.train_dir": "the data set",
       "data.train_ann": "the data set", "data.train_images": "the data set",
       "data.dictionary": "the classes", "data.num_classes": "the label head's shape",
       "data.img_size": "the model's input size", "data.mask_patch_size": "the masking objective's shape",
       "data.crop_size": "the model's input size", "objectives.": "which heads and losses exist",
       "objectives.swav.queue_length": "the SwAV queue's shape", "run.precision": "the checkpoint's files"}


@dataclass
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {_shown(self.old)} -> {_shown(self.new)}"


def _shown(v: Any) -> str:
    text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 80 else text[:77] + "..."


def is_fixed(key: str) -> bool:
    if key in CHANGEABLE:
        return False
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FIXED)


def _why(key: str) -> str:
    best = max((k for k in WHY if key == k or (k.endswith(".") and key.startswith(k))), key=len, default="")
    return WHY.get(best, "the saved state")


def diff(old: dict, new: dict) -> list[Change]:
    """Keys whose value differs; keys only one side has (a config from another hvpmtl version) are not changes."""
    a, b = flatten(old), flatten(new)
    return [Change(k, a[k], b[k]) for k in b if k in a and a[k] != b[k]]


def saved_config(rank_state: Optional[dict], out_dir: Path) -> tuple[Optional[dict], str]:
    """(the config the checkpoint was trained with, where it came from): the rank state's copy, else the run's
    config.yaml (checkpoints from before issue 23), else (None, '')."""
    if rank_state is not None and isinstance(rank_state.get("config"), dict):
        return rank_state["config"], "the checkpoint"
    path = Path(out_dir) / "config.yaml"
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None, ""
    return (loaded, str(path)) if isinstance(loaded, dict) else (None, "")


def check_changes(old: dict, new: dict, source: str) -> list[Change]:
    """The changes a resume applies; a ConfigError naming every key it cannot change."""
    changes = diff(old, new)
    refused = [c for c in changes if is_fixed(c.key)]
    if refused:
        named = "; ".join(f"{c} (fixed by {_why(c.key)})" for c in refused)
        raise ConfigError(f"--resume: this config changes what the checkpoint cannot follow: {named}. The "
                          f"checkpoint was trained with the config in {source}. Set the key(s) back to resume, or "
                          "start a new run with this config: --resume fresh (moves this run's files to superseded/) "
                          "or another run.output_dir")
    return changes


def describe(changes: list[Change]) -> str:
    return "; ".join(str(c) for c in changes)
