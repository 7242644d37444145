"""What a resumed run may change in its config, and the refusal of what it may not (issue 23).

A run resumed with another config either applies each change from the resumed step or refuses it, never
half-applies it. The config a checkpoint was trained with travels in each rank's state (`rank_state["config"]`,
read before the model is built), and the diff is taken key by key on
the flattened configs with paths made absolute.

Refused (FIXED): what the weights, the optimizer's shapes or the data order depend on: the model (except
dropout, drop-path and gradient checkpointing), the training data's source, class count, image and mask size,
data.seed, which objectives exist and SwAV's queue, the precision (other checkpoint files), the fine-tuning task.
Everything else applies from the resumed step: the LR and its schedule (rebuilt at the step: runtime.Trainer
overrides the scheduler state DeepSpeed restores), batch sizes (the data position is global), weight decay and
betas, epochs and max_steps, evaluation and checkpoint cadence, augmentation, the skip policy (the loader maps
its position by sample id: hvpmtl/data/loaders/order.py), logging and tracking.

At the resumed step (`Trainer.resume`): DeepSpeed's load puts back the checkpoint's base LRs and parameter-group
settings; `scheduler_settings` (read before the load) and `restore_scheduler` (after it) put this config's back, and
the trainer says the schedule's shape (`schedule_shape`, kept in checkpoints) when it changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


from hvpmtl.config import ConfigError, absolute_paths, flatten

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


def saved_config(rank_state: Optional[dict]) -> Optional[dict]:
    """The config the checkpoint was trained with (every save puts it in each rank's state), or None."""
    config = (rank_state or {}).get("config")
    return config if isinstance(config, dict) else None


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


def changes_at_resume(choice, cfg) -> list[Change]:
    """The config keys a resume from `choice` (hvpmtl.checkpoint.Choice; None: a fresh start) changes; a
    ConfigError naming any it cannot change, before the data, model or engine is built."""
    if choice is None:
        return []
    old = saved_config(choice.rank_state)
    if old is None:
        return []
    return check_changes(old, absolute_paths(cfg), "the checkpoint")


# ---------------------------------------------------------------------------- the LR schedule at the resumed step
def scheduler_settings(engine) -> Optional[tuple[list, list]]:
    """The LR scheduler's base LRs and each parameter group's other settings (weight decay, betas...) as this
    config built them: DeepSpeed's load puts the checkpoint's back, which would half-apply a changed config."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None or not hasattr(sched, "lr_lambdas"):
        return None
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
              for g in sched.optimizer.param_groups]
    return list(sched.base_lrs), groups


def restore_scheduler(sched, fresh: tuple[list, list]) -> None:
    """After a load: this config's optimizer settings, and its LR schedule at the resumed step (the lambdas are
    this config's; base LRs, group settings and the current LR are set back from `fresh`)."""
    base, groups = fresh
    sched.base_lrs = list(base)
    for i, (group, settings) in enumerate(zip(sched.optimizer.param_groups, groups)):
        group.update(settings)
        group["initial_lr"] = base[i]
        group["lr"] = base[i] * sched.lr_lambdas[i](sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def schedule_shape(optim, steps_per_epoch: float, total_steps: int, global_batch: int) -> dict:
    return {"steps/epoch": int(steps_per_epoch), "total steps": int(total_steps),
            "warm-up steps": int(round(optim.warmup_epochs * steps_per_epoch)),
            "shape": getattr(optim, "schedule", "cosine"), "min_lr": optim.min_lr, "global batch": int(global_batch)}


def describe_schedule(was: dict, now: dict) -> str:
    return ", ".join(f"{k} {was[k]} -> {v}" if k in was and was[k] != v else f"{k} {v}" for k, v in now.items())
