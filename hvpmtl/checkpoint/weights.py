"""Reading weights for export, evaluation and fine-tuning: a run checkpoint's student or EMA teacher
(`read_weights`, `read_backbone`), and any file `hvpmtl export` writes (`read_backbone_file`).

Every checkpoint file is checked against its manifest and read by the weights-only unpickler; a file that
would run code when loaded is refused (safe_load.UnsafeFileError). `read_backbone`'s default choice between
student and teacher is hvpmtl.schedules.default_weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

import hvpmtl.checkpoint.safe_load as safe_load
from hvpmtl.checkpoint.manifest import (MODEL_FILE, ZERO_FILE, CheckpointError, candidates, check_contents,
                                        check_presence, glob_safe, read_manifest, resolve_tag)
from hvpmtl.config import load_config
from hvpmtl.schedules import default_weights

TIMM_PREFIX = "backbone.model."  # where the timm model sits inside Student and Teacher


def _model_states(tag_dir: Path) -> tuple[dict, dict]:
    """(the engine's model-states file, the manifest), checked against the manifest and read weights-only."""
    try:
        m = read_manifest(tag_dir)
    except ValueError as e:
        raise CheckpointError(f"{tag_dir}: not a usable checkpoint ({e})") from None
    why = check_presence(tag_dir, m)
    if MODEL_FILE not in m["files"]:
        why = why or f"no {MODEL_FILE} (not a DeepSpeed checkpoint of the engine?)"
    why = why or check_contents(tag_dir, m, [MODEL_FILE])
    if why:
        raise CheckpointError(f"{tag_dir}: not a usable checkpoint ({why})")
    return safe_load.load_torch(tag_dir / MODEL_FILE), m


def _weights(tag_dir: Path, ckpt: dict, m: dict, which: str) -> dict[str, torch.Tensor]:
    if which == "teacher":
        if ckpt.get("teacher") is None:
            raise CheckpointError(f"{tag_dir / MODEL_FILE}: no teacher (distillation was off in this run); "
                                  "use the student")
        return {k: v.detach().float() for k, v in ckpt["teacher"].items()}
    if which != "student":
        raise CheckpointError(f"which must be 'teacher' or 'student', got '{which}'")
    module = ckpt.get("module")
    if module is None:
        raise CheckpointError(f"{tag_dir / MODEL_FILE}: no 'module' state dict")
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in module.values()):
        # bf16/fp16 training: the module holds rounded copies; DeepSpeed's reader of the fp32 master weights
        # unpickles without restriction, so every file it opens is checked first
        why = check_contents(tag_dir, m, [n for n in m["files"] if ZERO_FILE.fullmatch(n)])
        if why:
            raise CheckpointError(f"{tag_dir}: not a usable checkpoint ({why})")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with glob_safe(tag_dir.parent) as parent:
            module = get_fp32_state_dict_from_zero_checkpoint(str(parent), tag=tag_dir.name)
    return {k: v.detach().float() for k, v in module.items()}


def read_weights(tag_dir: str | Path, which: str = "student") -> tuple[dict[str, torch.Tensor], dict]:
    """The fp32 state dict of a checkpoint's model: 'student' (the engine's module; fp32 master weights
    from the ZeRO partitions when it trained in bf16/fp16) or 'teacher' (the EMA copy in the client
    state). Every file is checked against the manifest and read weights-only. Returns (state, info)."""
    tag_dir = Path(tag_dir)
    ckpt, m = _model_states(tag_dir)
    info = {"checkpoint": tag_dir.name, "step": ckpt.get("step", m["step"]), "which": which, "run_id": m["run_id"]}
    return _weights(tag_dir, ckpt, m, which), info


def read_backbone(run_dir: str | Path, checkpoint: Optional[str | Path] = None, which: str = "auto"):
    """A pre-training run's backbone: (timm state dict fp32, the run's config, info). `checkpoint` is a tag
    folder or a tag name (default: the newest complete one); `which` auto|teacher|student — auto picks by
    `default_weights`. info says which weights, from which tag and step, and why."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml (is it a run.output_dir of `launchers/pretrain.py`?)")
    cfg = load_config(cfg_path)
    ckpt_dir = run_dir / "checkpoints"
    if checkpoint is not None:
        tag = resolve_tag(ckpt_dir, checkpoint)
    else:
        found = candidates(ckpt_dir)
        if not found:
            raise CheckpointError(f"{run_dir}: no complete checkpoint under {ckpt_dir}")
        tag = found[0]
    if which not in ("auto", "teacher", "student"):
        raise CheckpointError(f"--which must be auto, teacher or student, got '{which}'")
    ckpt, m = _model_states(tag)
    step = int(ckpt.get("step", m["step"]))
    why = f"--which {which}"
    if which == "auto":
        which, why = default_weights(cfg, step, ckpt.get("teacher") is not None)
    state = _weights(tag, ckpt, m, which)
    info = {"checkpoint": tag.name, "step": step, "run_id": m["run_id"]}
    out = {k[len(TIMM_PREFIX):]: v.contiguous() for k, v in state.items() if k.startswith(TIMM_PREFIX)}
    if not out:
        raise CheckpointError(f"{tag / MODEL_FILE} [{which}]: no '{TIMM_PREFIX}*' weights in it")
    info.update(which=which, reason=why, run_dir=str(run_dir.resolve()), timm_model=cfg.model.backbone,
                img_size=cfg.model.img_size)
    return out, cfg, info


def read_backbone_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(timm state dict, metadata) from any `hvpmtl export` file: timm safetensors, an mmdet/mmseg or
    detectron2 .pth (read weights-only) or a detectron2 .pkl (numpy arrays only); prefixes are removed.
    A file that would run code when loaded is refused (safe_load.UnsafeFileError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    obj = safe_load.load_numpy_pickle(path) if path.suffix == ".pkl" else safe_load.load_torch(path)
    if isinstance(obj, dict) and "state_dict" in obj:  # mmdet / mmseg
        meta = dict(obj.get("meta", {}).get("hvpmtl", {}))
        state = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj:  # detectron2
        meta = dict(obj.get("hvpmtl", {}))
        state = obj["model"]
    else:
        raise CheckpointError(f"{path}: neither a safetensors file nor a dict with 'state_dict' or 'model'")
    prefix = meta.get("prefix", "")
    if meta.get("features_only"):
        raise CheckpointError(f"{path}: a --features-only export holds timm's features_only keys; export the timm "
                              "format to read it back here")
    return {k[len(prefix):]: torch.as_tensor(v) for k, v in state.items() if k.startswith(prefix)}, meta
