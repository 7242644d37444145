"""A checkpoint tag on disk: its name, its manifest, and the checks a reader makes before trusting it.

Layout of `run.output_dir`:

    .hvpmtl.lock                 exclusive lock of the job writing this run (run_lock.py)
    checkpoints/step_00001000/   DeepSpeed's files (mp_rank_00_model_states.pt, one
                                 zero_pp_rank_<r>_mp_rank_00_optim_states.pt per rank), one rank_<r>.pt per
                                 rank (RNG, data position, SwAV queue: plain tensors, lists, strings) and,
                                 written last by rank 0, COMPLETE: the manifest
    checkpoints/latest           the last tag written (replaced atomically after its manifest)
    superseded/<run id>-<time>/  what `--resume fresh` moved out of the way

The manifest (JSON) names the run (`run_id`), the step, the world size, whether the state is finite
(`weights_finite`) and every file that world size needs, each with its size, SHA-256 and the ranks that
load it. A tag is complete when its manifest is readable and every file has its size (stat only); its
contents are good when each file matches its checksum and parses with the weights-only unpickler.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import hvpmtl.checkpoint.safe_load as safe_load
from hvpmtl.checkpoint.run_lock import LockError
from hvpmtl.dist import on_rank0
from hvpmtl.fileio import sha256_file
from hvpmtl.notices import notice

TAG_PREFIX = "step_"
MANIFEST = "COMPLETE"
MANIFEST_FORMAT = 2
MODEL_FILE = "mp_rank_00_model_states.pt"
UNIVERSAL_DIR = ".universal"
SUPERSEDED_DIR = "superseded"
EXIT_CHECKPOINT = 6  # the run's saved state cannot be used safely (see CheckpointError)
RESUME_MODES = ("auto", "none", "fresh")
# what `--resume fresh` moves out of a used output_dir (known names only: output_dir may hold other things)
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "ds_config.json", "backbone.safetensors",
             "model.safetensors", "classes.json")
ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
RANK_FILE = re.compile(r"rank_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """The run's saved state cannot be used safely; the job stops with EXIT_CHECKPOINT."""

    exit_code = EXIT_CHECKPOINT


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag_dir: Path) -> int:
    return int(tag_dir.name[len(TAG_PREFIX):])


def tag_dirs(ckpt_dir: str | Path) -> list[Path]:
    """Every step_* folder, oldest first (by step)."""
    ckpt_dir = Path(ckpt_dir)
    found = [p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and p.name[len(TAG_PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def rank0_decides(fn, *args):
    """fn run on rank 0 only (the run's decisions: the lock, the mode, a conversion, the commit of a save); its
    result reaches every rank, and its CheckpointError or LockError is a CheckpointError on every rank."""
    return on_rank0(fn, *args, errors=(CheckpointError, LockError), raise_as=CheckpointError)


def read_manifests(ckpt_dir: Path) -> list[tuple[Path, dict]]:
    """(tag folder, manifest) of every tag with a readable manifest, oldest first."""
    out = []
    for t in tag_dirs(ckpt_dir):
        try:
            out.append((t, read_manifest(t)))
        except ValueError:
            pass
    return out


def read_manifest(tag_dir: Path) -> dict:
    """The manifest of a tag; ValueError with the reason when there is none or it is unreadable. A manifest
    without `format` >= MANIFEST_FORMAT, a run id and the weights_finite flag is of a checkpoint format this
    hvpmtl does not read."""
    marker = tag_dir / MANIFEST
    if not marker.is_file():
        raise ValueError("no COMPLETE manifest (the save was interrupted)")
    try:
        m = json.loads(marker.read_text())
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
        fmt, run_id = m.get("format"), m.get("run_id")
        if type(fmt) is not int or fmt < MANIFEST_FORMAT or not isinstance(run_id, str) or not run_id:
            raise ValueError(f"format {fmt if fmt is not None else '(none)'}"
                             f"{'' if isinstance(run_id, str) and run_id else ' without a run id'}: written by an "
                             f"unsupported checkpoint format (this hvpmtl reads format {MANIFEST_FORMAT} and later)")
        if not isinstance(m.get("weights_finite"), bool):
            raise ValueError(f"format {fmt} without the weights_finite flag: written by an unsupported checkpoint "
                             "format (a development version of hvpmtl)")
        files = m["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not a mapping of file names")
        for name, e in files.items():
            if not isinstance(e, dict) or "size" not in e:
                raise ValueError(f"bad entry for {name}")
        int(m["step"]), int(m["world_size"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"unreadable manifest: {e}") from None
    return m


def needed_by(entry: dict, rank: int) -> bool:
    ranks = entry.get("ranks", "all")
    return ranks == "all" or rank in ranks


def check_presence(tag_dir: Path, manifest: dict) -> str:
    """'' when every file the manifest lists is there with its size, else why not (cheap: stat only)."""
    for rel, e in manifest["files"].items():
        p = tag_dir / rel
        if not p.is_file():
            return f"missing {rel}"
        if p.stat().st_size != e["size"]:
            return f"{rel} is {p.stat().st_size} bytes, manifest says {e['size']} (truncated?)"
    return ""


def check_contents(tag_dir: Path, manifest: dict, names) -> str:
    """'' when each named file matches its checksum and parses with the weights-only unpickler."""
    for rel in names:
        e = manifest["files"][rel]
        p = tag_dir / rel
        if e.get("sha256") and sha256_file(p) != e["sha256"]:
            return f"{rel} does not match its checksum (damaged or replaced since it was written)"
        try:
            check_unpickles(p)
        except safe_load.UnsafeFileError as err:
            return str(err)
    return ""


def check_unpickles(path: Path) -> None:
    """A full pass of the weights-only unpickler over the file, tensor data mapped, not read."""
    try:
        safe_load.load_torch(path, mmap=True)
    except safe_load.UnsafeFileError as e:
        if "mmap" not in str(e):
            raise
        safe_load.load_torch(path)  # a file in torch's legacy (non-zip) format cannot be mapped


def is_complete(tag_dir: Path) -> tuple[bool, str]:
    """Manifest readable and every listed file present with its size (no checksums: cheap)."""
    try:
        m = read_manifest(Path(tag_dir))
    except ValueError as e:
        return False, str(e)
    why = check_presence(Path(tag_dir), m)
    return not why, why


def candidates(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints (manifest and file sizes), newest first; a warning for each one skipped."""
    out = []
    for t in reversed(tag_dirs(ckpt_dir)):
        ok, why = is_complete(t)
        if ok and read_manifest(t).get("weights_finite") is False:
            ok, why = False, "its weights are not finite (weights_finite: false in its manifest)"
        if ok:
            out.append(t)
        else:
            notice(f"checkpoint {t} is not usable ({why}); trying an older one")
    return out


def resolve_tag(ckpt_dir: str | Path, name: str | Path) -> Path:
    """A checkpoint given as a folder path or as a tag name under `ckpt_dir` (`step_00000100`)."""
    p = Path(name)
    if p.is_dir():
        return p
    under = Path(ckpt_dir) / str(name)
    if under.is_dir():
        return under
    have = ", ".join(t.name for t in tag_dirs(ckpt_dir)[-5:]) or "none"
    raise CheckpointError(f"checkpoint '{name}': neither a folder nor a tag under {ckpt_dir} (tags there: {have})")


@contextlib.contextmanager
def glob_safe(path: Path):
    """DeepSpeed finds checkpoint files with glob(), so a folder whose path holds [ ] * ? (a Slurm array's
    `run[3]`) would match nothing: it is reached through a private symlink with a plain name instead."""
    if not any(c in str(path) for c in "[]*?"):
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="hvpmtl-ckpt-"))
    link = tmp / "dir"
    os.symlink(Path(path).resolve(), link)
    try:
        yield link
    finally:
        link.unlink()
        tmp.rmdir()

