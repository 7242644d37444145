"""Export of the pre-trained backbone for timm, MMDetection/MMSegmentation and Detectron2.

    hvpmtl export --run-dir RUN [--checkpoint TAG] [--which auto|teacher|student]
                  [--format timm|mmdet|mmseg|detectron2] [--prefix P] [--features-only] --out FILE

The weights are read from a DeepSpeed checkpoint of the engine (<run>/checkpoints/step_*/, checked
against its manifest and read weights-only) by hvpmtl.checkpoint.read_backbone: the student
(fp32 master weights) or the EMA teacher; `auto` takes the teacher only once less than 1% of it is
its random initialisation (hvpmtl.schedules.default_weights), and the choice is printed. The format
follows the --out suffix (.safetensors: timm, .pkl: detectron2; .pth needs --format) and a
mismatch is refused. Keys are always timm's own (`MaskableBackbone.model`); only a prefix differs:

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
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

# torch, safetensors and hvpmtl.checkpoint are imported where they are used: `hvpmtl --help` (which builds
# this command's parser) answers without loading torch.

FORMATS = ("timm", "mmdet", "mmseg", "detectron2")
DEFAULT_PREFIX = {"timm": "", "mmdet": "backbone.timm_model.", "mmseg": "backbone.timm_model.", "detectron2": ""}
SUFFIXES = {"timm": (".safetensors",), "mmdet": (".pth",), "mmseg": (".pth",), "detectron2": (".pth", ".pkl")}


class ExportError(ValueError):
    """A run, checkpoint or file that cannot be exported, with the path in the message."""


def _shared_mode(path: Path) -> Path:
    """Files are written as the user's umask allows (safetensors creates them 0600): group members of a
    shared cluster project read what a colleague exported."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return path


def timm_state_dict(backbone) -> dict[str, torch.Tensor]:
    """The wrapped timm model's own keys (MaskableBackbone.model), fp32, contiguous."""
    return {k: v.detach().float().cpu().contiguous() for k, v in backbone.model.state_dict().items()}


def save_timm_backbone(backbone, path: str | Path, metadata: Optional[dict] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "timm_model": backbone.name, "img_size": str(backbone.img_size)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    from safetensors.torch import save_file

    save_file(timm_state_dict(backbone), str(path), metadata=meta)
    return _shared_mode(path)


# ----------------------------------------------------------------------------- reading


def read_run_backbone(run_dir: str | Path, checkpoint: Optional[str | Path] = None, which: str = "auto"):
    """(timm state dict fp32, the run's ExperimentConfig, info dict) from a run's checkpoint: see
    hvpmtl.checkpoint.read_backbone. info names the weights (which, reason, checkpoint, step)."""
    import hvpmtl.checkpoint as ckpt

    try:
        return ckpt.read_backbone(run_dir, checkpoint, which)
    except (ckpt.CheckpointError, ckpt.UnsafeFileError) as e:
        raise ExportError(str(e)) from None


def read_backbone_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(timm state dict, metadata) from any export of this module (hvpmtl.checkpoint.read_backbone_file:
    safetensors, weights-only .pth, numpy-only .pkl)."""
    import hvpmtl.checkpoint as ckpt

    try:
        return ckpt.read_backbone_file(path)
    except (ckpt.CheckpointError, ckpt.UnsafeFileError) as e:
        raise ExportError(str(e)) from None


def describe(info: dict) -> str:
    """One line naming the weights a command uses."""
    return (f"{info['which']} of {info.get('run_dir', '?')} at {info['checkpoint']} (step {info['step']}): "
            f"{info.get('reason', '')}")


# ----------------------------------------------------------------------------- writing


def _features_only_state(state: dict, name: str, img_size: int) -> dict[str, torch.Tensor]:
    """The keys of timm's features_only wrapper: timm loads the file into the plain model, then wraps it."""
    import timm
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "backbone.safetensors"
        save_file(state, str(f))
        m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(f)), features_only=True,
                              img_size=img_size)
    return {k: v.detach().contiguous() for k, v in m.state_dict().items()}


def check_out(out: str | Path) -> Path:
    """Refuse an --out that cannot be written, before the (slow) checkpoint read: a folder, a path under a
    regular file, a folder this user cannot write (probed by creating the temporary file the export uses)."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out}: is a folder; name the file to write, e.g. {out / ('backbone' + out.suffix)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ExportError(f"--out {out}: a part of {out.parent} is a regular file, not a folder") from None
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create the folder {out.parent}: {e.strerror}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write in {out.parent}: {e.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    return out


def write_export(state: dict[str, torch.Tensor], out: str | Path, fmt: str, info: dict,
                 prefix: Optional[str] = None, features_only: bool = False) -> Path:
    """Write `state` (timm keys) in `fmt`; `info` needs timm_model and img_size. The file is written under a
    temporary name in the destination folder and renamed: a failed export (disk full) leaves no half file."""
    out = check_out(out)
    fmt = format_for(out, fmt)
    if features_only and fmt not in ("mmdet", "mmseg"):
        raise ExportError("--features-only applies to the mmdet and mmseg formats")
    prefix = DEFAULT_PREFIX[fmt] if prefix is None else prefix
    if fmt == "timm" and prefix:
        raise ExportError("the timm format takes no --prefix: timm loads its own keys")
    meta = {k: v for k, v in info.items() if v is not None}
    meta.update(prefix=prefix, features_only=features_only, keys="timm")
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_format(state, tmp, fmt, out.suffix, info, meta, prefix, features_only)
        _shared_mode(tmp)
        os.replace(tmp, out)
    except OSError as e:  # the disk full while writing: one line naming --out (hvpmtl/cli.py), not the temporary
        if e.filename not in (None, str(tmp)):
            raise
        raise OSError(e.errno, e.strerror, str(out)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_format(state, path: Path, fmt: str, suffix: str, info: dict, meta: dict, prefix: str,
                  features_only: bool) -> None:
    from safetensors.torch import save_file

    from hvpmtl.fileio import torch_save

    if fmt == "timm":
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path),
                      metadata={"format": "pt", **{k: str(v) for k, v in meta.items()}})
        except Exception as e:  # noqa: BLE001 -- safetensors' Rust writer says the OS error in its message
            code = re.search(r"\(os error (\d+)\)", str(e))  # "No space left on device (os error 28)"
            if isinstance(e, OSError) or code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
        return
    if features_only:
        state = _features_only_state(state, info["timm_model"], int(info["img_size"]))
    keyed = {prefix + k: v for k, v in state.items()}
    if fmt in ("mmdet", "mmseg"):
        torch_save({"state_dict": keyed, "meta": {"hvpmtl": meta}}, path)
    elif suffix == ".pkl":
        obj = {"model": {k: v.numpy() for k, v in keyed.items()}, "__author__": "hvpmtl",
               "matching_heuristics": True, "hvpmtl": meta}
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch_save({"model": keyed, "__author__": "hvpmtl", "matching_heuristics": True, "hvpmtl": meta}, path)


def format_for(out: Path, fmt: Optional[str]) -> str:
    """The export format: the one given, which must fit the file suffix, or the one the suffix implies."""
    if fmt is not None and fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    fits = [f for f in FORMATS if out.suffix in SUFFIXES[f]]
    if fmt is None:
        if len(fits) == 1:
            return fits[0]
        raise ExportError(f"--out {out}: give --format ({' or '.join(fits) if fits else ', '.join(FORMATS)}); "
                          "the suffix does not decide it" + ("" if fits else
                                                            " (.safetensors: timm, .pth: mmdet/mmseg/detectron2, "
                                                            ".pkl: detectron2)"))
    if fmt not in fits:
        raise ExportError(f"--format {fmt} writes {' or '.join(SUFFIXES[fmt])}, not '{out.suffix or '(no suffix)'}': "
                          f"name the file {out.with_suffix(SUFFIXES[fmt][0]).name} (or pick the format of its suffix)")
    return fmt


def export_run(run_dir: str | Path, out: str | Path, fmt: Optional[str] = None,
               checkpoint: Optional[str | Path] = None, which: str = "auto", prefix: Optional[str] = None,
               features_only: bool = False) -> Path:
    """Export a run's backbone; `fmt` None: from the suffix of `out`."""
    fmt = format_for(Path(out), fmt)  # before the (slow) read: a wrong name fails at once
    check_out(out)
    state, _, info = read_run_backbone(run_dir, checkpoint, which)
    return write_export(state, out, fmt, info, prefix, features_only)


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers) -> None:
    from hvpmtl.cli import HelpFormatter

    p = subparsers.add_parser("export", help="export a run's pre-trained backbone (timm, mmdet, mmseg, detectron2)",
                              description=__doc__.split("\n\n")[1] if __doc__ else None,
                              formatter_class=HelpFormatter)
    p.add_argument("--run-dir", required=True, help="the run's output_dir (holds config.yaml and checkpoints/)")
    add_weights_arguments(p)
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="default: from the --out suffix (.safetensors: timm, .pkl: detectron2); .pth needs it")
    p.add_argument("--prefix", default=None,
                   help="key prefix (default: 'backbone.timm_model.' for mmdet/mmseg, none otherwise)")
    p.add_argument("--features-only", action="store_true",
                   help="mmdet/mmseg: keys of timm's features_only wrapper (TIMMBackbone(features_only=True))")
    p.add_argument("--out", required=True, help="output file (.safetensors for timm, .pth, or .pkl for detectron2)")
    p.set_defaults(func=_main)


def add_weights_arguments(p) -> None:
    """--checkpoint and --which, shared by `hvpmtl export` and `hvpmtl eval`."""
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint of --run-dir: tag name (step_00001000) or folder (default: the newest complete)")
    p.add_argument("--which", default="auto", choices=("auto", "teacher", "student"),
                   help="auto: the EMA teacher once less than 1%% of it is its random start, else the "
                        "student (docs/EVAL.md); the choice is printed")


def _main(args) -> int:
    from hvpmtl.config import ConfigError

    try:
        fmt = format_for(Path(args.out), args.format)  # a wrong name fails before the (slow) read
        check_out(args.out)  # and so does a destination that cannot be written
        print(f"hvpmtl export: reading {args.run_dir} ...", file=sys.stderr, flush=True)
        state, _, info = read_run_backbone(args.run_dir, args.checkpoint, args.which)
        print(f"hvpmtl export: using the {describe(info)}", file=sys.stderr, flush=True)
        path = write_export(state, args.out, fmt, info, args.prefix, args.features_only)
    except (ExportError, ConfigError) as e:
        print(f"hvpmtl export: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(path), "format": fmt, "which": info["which"], "checkpoint": info["checkpoint"],
                      "step": info["step"]}))
    return 0
