"""Crash-safe checkpoints through the DeepSpeed engine.

Layout: <dir>/step_00001000/ holds DeepSpeed's files, one `rank_<r>.pt` per rank (RNG states,
data position, SwAV queue: things that differ per rank) and, last, `COMPLETE` (a manifest of
every file with its size), written by rank 0 after a barrier. `latest` is replaced atomically
only after that. A tag without a valid manifest (crash mid-save, truncated file) is never
loaded: the newest complete one is, with a warning for each one passed over.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _manifest(tag_dir: Path) -> dict:
    return {str(p.relative_to(tag_dir)): p.stat().st_size
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != "COMPLETE"}


def is_complete(tag_dir: Path) -> tuple[bool, str]:
    marker = tag_dir / "COMPLETE"
    if not marker.is_file():
        return False, "no COMPLETE manifest (the save was interrupted)"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return False, f"unreadable manifest: {e}"
    for rel, size in expected.items():
        p = tag_dir / rel
        if not p.is_file():
            return False, f"missing {rel}"
        if p.stat().st_size != size:
            return False, f"{rel} is {p.stat().st_size} bytes, manifest says {size} (truncated?)"
    return True, ""


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, rank_state: dict, keep: int) -> Path:
    """Every rank calls this. Returns the tag directory."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and tag_dir.exists():  # an earlier interrupted save of the same step
        shutil.rmtree(tag_dir)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, tag_dir / f"rank_{rank}.pt")
    _barrier()
    if rank == 0:
        for f in tag_dir.rglob("*"):  # data on disk before the manifest vouches for it
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        (tag_dir / "COMPLETE").write_text(json.dumps({"step": step, "files": _manifest(tag_dir)}))
        tmp = ckpt_dir / ".latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        _prune(ckpt_dir, keep)
    _barrier()
    return tag_dir


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
    complete = [t for t in tags if is_complete(t)[0]]
    for t in complete[:-keep]:
        shutil.rmtree(t, ignore_errors=True)
    # incomplete tags older than the newest complete one are debris of crashed saves
    if complete:
        for t in tags:
            if t not in complete and t.name < complete[-1].name:
                shutil.rmtree(t, ignore_errors=True)


def candidates(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, newest first; a warning for each incomplete one skipped."""
    ckpt_dir = Path(ckpt_dir)
    out = []
    for t in sorted((p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir()), reverse=True):
        ok, why = is_complete(t)
        if ok:
            out.append(t)
        else:
            warnings.warn(f"checkpoint {t} is not usable ({why}); trying an older one")
    return out


def load(engine, tag_dir: Path) -> tuple[dict, dict]:
    """Loads model, optimizer, LR schedule; returns (client_state, this rank's rank_state)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rank_file = tag_dir / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise RuntimeError(f"checkpoint {tag_dir} has no {rank_file.name}: it was written by a run with fewer "
                           f"ranks; resuming on a different world size restores weights but not per-rank state")
    return client_state, torch.load(rank_file, weights_only=False)


def resume_latest(engine, ckpt_dir: str | Path, log=print):
    """Newest loadable checkpoint: (tag_dir, client_state, rank_state) or None. A checkpoint that
    fails to load is reported and the previous one tried; all ranks agree on the choice."""
    for tag_dir in candidates(ckpt_dir):
        try:
            client_state, rank_state = load(engine, tag_dir)
        except Exception as e:  # noqa: BLE001 — a damaged file must fall back, not end the job
            warnings.warn(f"checkpoint {tag_dir} could not be loaded ({type(e).__name__}: {e}); trying an older one")
            continue
        log(f"resumed from {tag_dir}")
        return tag_dir, client_state, rank_state
    return None


def resume(engine, ckpt_dir: str | Path, how: str, log=print):
    """`--resume` semantics shared by pre-training and fine-tuning: 'auto' = the newest loadable checkpoint
    in ckpt_dir (None if there is none), else the path of one checkpoint, which must be complete."""
    if how == "auto":
        return resume_latest(engine, ckpt_dir, log=log)
    tag_dir = Path(how)
    ok, why = is_complete(tag_dir)
    if not ok:
        from hvpmtl.config import ConfigError
        raise ConfigError(f"--resume {how}: not a usable checkpoint ({why})")
    return (tag_dir, *load(engine, tag_dir))
