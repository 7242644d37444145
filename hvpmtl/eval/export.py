"""Export of the pre-trained backbone for timm, MMDetection/MMSegmentation and Detectron2.

    hvpmtl export --run-dir RUN [--checkpoint TAG_DIR] [--which auto|teacher|student]
                  --format timm|mmdet|mmseg|detectron2 [--prefix P] [--features-only] --out FILE

The weights are read from a DeepSpeed checkpoint of the engine (<run>/checkpoints/step_*/):
the teacher (EMA, fp32, in the client state) when distillation ran, else the student
('module'; fp32 master weights recovered from the ZeRO partitions when it trained in bf16/fp16).
Keys are always timm's own (`MaskableBackbone.model`); only a prefix differs per format:

  timm        safetensors; timm.create_model(name, pretrained=True, num_classes=0, img_size=S,
              pretrained_cfg_overlay=dict(file=PATH)) loads it with no missing or unexpected key
  mmdet/mmseg torch .pth {"state_dict": {"backbone.timm_model.<timm key>": ...}, "meta": {...}}: the
              keys of OpenMMLab's TIMMBackbone, which keeps the timm model as `self.timm_model`.
              With --features-only the keys are those of timm's features_only wrapper (what
              TIMMBackbone(features_only=True) holds; ViT: `model.` prefix, Swin: `layers_1`...)
  detectron2  .pth (torch tensors) or .pkl (numpy) {"model": {...}, "__author__": "hvpmtl",
              "matching_heuristics": True}: Detectron2 matches the timm keys by suffix
"""
from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, safe_open, save_file

FORMATS = ("timm", "mmdet", "mmseg", "detectron2")
DEFAULT_PREFIX = {"timm": "", "mmdet": "backbone.timm_model.", "mmseg": "backbone.timm_model.", "detectron2": ""}
MODEL_FILE = "mp_rank_00_model_states.pt"
TIMM_PREFIX = "backbone.model."  # where the timm model sits inside Student and Teacher


class ExportError(ValueError):
    """A run, checkpoint or file that cannot be exported, with the path in the message."""


def timm_state_dict(backbone) -> dict[str, torch.Tensor]:
    """The wrapped timm model's own keys (MaskableBackbone.model), fp32, contiguous."""
    return {k: v.detach().float().cpu().contiguous() for k, v in backbone.model.state_dict().items()}


def save_timm_backbone(backbone, path: str | Path, metadata: Optional[dict] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "timm_model": backbone.name, "img_size": str(backbone.img_size)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file(timm_state_dict(backbone), str(path), metadata=meta)
    return path


# ----------------------------------------------------------------------------- reading


def find_checkpoint(run_dir: str | Path, checkpoint: Optional[str | Path] = None) -> Path:
    """The given tag dir (checked complete) or the newest complete one under <run>/checkpoints."""
    from hvpmtl.train.checkpoint import candidates, is_complete

    if checkpoint is not None:
        tag = Path(checkpoint)
        ok, why = is_complete(tag)
        if not ok:
            raise ExportError(f"--checkpoint {tag}: not a usable checkpoint ({why})")
        return tag
    found = candidates(Path(run_dir) / "checkpoints")
    if not found:
        raise ExportError(f"{run_dir}: no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    return found[0]


def _strip(state: dict, prefix: str, source: str) -> dict[str, torch.Tensor]:
    out = {k[len(prefix):]: v.detach().float().cpu().contiguous() for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ExportError(f"{source}: no '{prefix}*' weights in it")
    return out


def read_run_backbone(run_dir: str | Path, checkpoint: Optional[str | Path] = None, which: str = "auto"):
    """(timm state dict fp32, the run's ExperimentConfig, info dict) from a run's checkpoint."""
    from hvpmtl.config import load_config

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"{run_dir}: no config.yaml (is it a run.output_dir of `launchers/pretrain.py`?)")
    cfg = load_config(cfg_path)
    tag = find_checkpoint(run_dir, checkpoint)
    model_file = tag / MODEL_FILE
    if not model_file.is_file():
        raise ExportError(f"{tag}: no {MODEL_FILE} (not a DeepSpeed checkpoint of the engine?)")
    ckpt = torch.load(model_file, map_location="cpu", weights_only=False)
    if which not in ("auto", "teacher", "student"):
        raise ExportError(f"--which must be auto, teacher or student, got '{which}'")
    teacher = ckpt.get("teacher")
    if which == "auto":
        which = "teacher" if teacher is not None else "student"
    if which == "teacher":
        if teacher is None:
            raise ExportError(f"{model_file}: no teacher (distillation was off in this run); use --which student")
        state = _strip(teacher, TIMM_PREFIX, f"{model_file} [teacher]")
    else:
        module = ckpt.get("module")
        if module is None:
            raise ExportError(f"{model_file}: no 'module' state dict")
        if any(v.dtype != torch.float32 for k, v in module.items() if k.startswith(TIMM_PREFIX)):
            # bf16/fp16 training: the module holds rounded copies; take ZeRO's fp32 master weights
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            module = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
        state = _strip(module, TIMM_PREFIX, f"{model_file} [student]")
    info = {"run_dir": str(run_dir.resolve()), "checkpoint": tag.name, "step": ckpt.get("step"), "which": which,
            "timm_model": cfg.model.backbone, "img_size": cfg.model.img_size}
    return state, cfg, info


def read_backbone_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(timm state dict, metadata) from any export of this module; prefixes are removed."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"backbone file {path} does not exist")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            obj = pickle.load(f)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "state_dict" in obj:  # mmdet / mmseg
        meta = dict(obj.get("meta", {}).get("hvpmtl", {}))
        state = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj:  # detectron2
        meta = dict(obj.get("hvpmtl", {}))
        state = obj["model"]
    else:
        raise ExportError(f"{path}: neither a safetensors file nor a dict with 'state_dict' or 'model'")
    prefix = meta.get("prefix", "")
    if meta.get("features_only"):
        raise ExportError(f"{path}: a --features-only export holds timm's features_only keys; export the timm "
                          "format to read it back here")
    state = {k[len(prefix):]: torch.as_tensor(v) for k, v in state.items() if k.startswith(prefix)}
    return state, meta


# ----------------------------------------------------------------------------- writing


def _features_only_state(state: dict, name: str, img_size: int) -> dict[str, torch.Tensor]:
    """The keys of timm's features_only wrapper: timm loads the file into the plain model, then wraps it."""
    import timm

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "backbone.safetensors"
        save_file(state, str(f))
        m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(f)), features_only=True,
                              img_size=img_size)
    return {k: v.detach().contiguous() for k, v in m.state_dict().items()}


def write_export(state: dict[str, torch.Tensor], out: str | Path, fmt: str, info: dict,
                 prefix: Optional[str] = None, features_only: bool = False) -> Path:
    """Write `state` (timm keys) in `fmt`; `info` needs timm_model and img_size."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if features_only and fmt not in ("mmdet", "mmseg"):
        raise ExportError("--features-only applies to the mmdet and mmseg formats")
    prefix = DEFAULT_PREFIX[fmt] if prefix is None else prefix
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in info.items() if v is not None}
    meta.update(prefix=prefix, features_only=features_only, keys="timm")
    if fmt == "timm":
        if prefix:
            raise ExportError("the timm format takes no --prefix: timm loads its own keys")
        save_file({k: v.contiguous() for k, v in state.items()}, str(out),
                  metadata={"format": "pt", **{k: str(v) for k, v in meta.items()}})
        return out
    if features_only:
        state = _features_only_state(state, info["timm_model"], int(info["img_size"]))
    keyed = {prefix + k: v for k, v in state.items()}
    if fmt in ("mmdet", "mmseg"):
        torch.save({"state_dict": keyed, "meta": {"hvpmtl": meta}}, out)
    elif out.suffix == ".pkl":
        obj = {"model": {k: v.numpy() for k, v in keyed.items()}, "__author__": "hvpmtl",
               "matching_heuristics": True, "hvpmtl": meta}
        with open(out, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save({"model": keyed, "__author__": "hvpmtl", "matching_heuristics": True, "hvpmtl": meta}, out)
    return out


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "timm", checkpoint: Optional[str | Path] = None,
               which: str = "auto", prefix: Optional[str] = None, features_only: bool = False) -> Path:
    state, _, info = read_run_backbone(run_dir, checkpoint, which)
    return write_export(state, out, fmt, info, prefix, features_only)


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a run's pre-trained backbone (timm, mmdet, mmseg, detectron2)",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--run-dir", required=True, help="the run's output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint tag dir (default: the newest complete one)")
    p.add_argument("--which", default="auto", choices=("auto", "teacher", "student"),
                   help="auto: the EMA teacher when distillation ran, else the student")
    p.add_argument("--format", default="timm", choices=FORMATS)
    p.add_argument("--prefix", default=None,
                   help="key prefix (default: 'backbone.timm_model.' for mmdet/mmseg, none otherwise)")
    p.add_argument("--features-only", action="store_true",
                   help="mmdet/mmseg: keys of timm's features_only wrapper (TIMMBackbone(features_only=True))")
    p.add_argument("--out", required=True, help="output file (.safetensors for timm, .pth, or .pkl for detectron2)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    import sys

    from hvpmtl.config import ConfigError

    try:
        path = export_run(args.run_dir, args.out, args.format, args.checkpoint, args.which, args.prefix,
                          args.features_only)
    except (ExportError, ConfigError) as e:
        print(f"hvpmtl export: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(path), "format": args.format}))
    return 0
