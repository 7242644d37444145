"""Checkpoints that belong to their run, one resume decision for all ranks, nothing half-loaded.

Layout of `run.output_dir`:

    .hvpmtl.lock                 exclusive lock of the job writing this run (hvpmtl/train/run_lock.py)
    checkpoints/step_00001000/   DeepSpeed's files (mp_rank_00_model_states.pt, one
                                 zero_pp_rank_<r>_mp_rank_00_optim_states.pt per rank), one rank_<r>.pt per
                                 rank (RNG, data position, SwAV queue: plain tensors, lists, strings) and,
                                 written last by rank 0, COMPLETE: the manifest
    checkpoints/latest           the last tag written (replaced atomically after its manifest)
    superseded/<run id>-<time>/  what `--resume fresh` moved out of the way

The manifest (JSON) names the run (`run_id`), the step, the world size and every file that world
size needs, each with its size, SHA-256 and the ranks that load it. Each rank hashes the files it
wrote itself (still in its page cache), so a save costs no extra read over the network.

Resuming (`open_run`, then `resume` once the engine exists) is one decision for all ranks:
rank 0 proposes this run's tags, newest first; every rank checks the files it will load (present,
sizes and checksums per the manifest, and parsable by the weights-only unpickler); all agree or
all move on to the next older tag together. Only then is anything loaded. If checkpoints exist
and none can be used, or DeepSpeed fails half-way through loading, the job stops with exit code
6 (`EXIT_CHECKPOINT`) and a message: it never trains from a half-loaded or foreign state.

A checkpoint of another world size is re-partitioned through DeepSpeed's universal checkpoint
(`deepspeed.checkpoint.ds_to_universal`, then `load_universal`): rank 0 converts it before the
model is built, every rank loads its new ZeRO partition of the fp32 master weights and Adam
moments. Per-rank state follows fixed rules: the data position is global (the loaders map it
to the new sharding), RNG streams are derived afresh per new rank, and the SwAV queue rows of all
old ranks are dealt out to the new ranks.

Pruning keeps the newest `keep` complete tags of this run (never the one just written) and
removes only this run's older tags and the debris of crashed saves; other runs' tags are left alone.

Only a finite state is saved (issue 19): before writing, one all-reduced flag says whether the weights, the
fp32 master partitions, the optimizer state (and the trainer's extra modules: the EMA teacher) are finite on
every rank (`nonfinite_state`). A non-finite state is not written at all (`NonFiniteState`), so it is never
COMPLETE nor `latest`; the manifest records `weights_finite: true`. Resume and `candidates` pass over a tag
whose manifest says false, and scan the tensors of a tag written before the flag existed. `rollback` reloads
this run's newest good tag into a running engine (run.on_nonfinite: rollback).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from hvpmtl.train import safe_load
from hvpmtl.train.run_lock import LockError, RunLock
from hvpmtl.train.safe_load import UnsafeFileError  # noqa: F401 — for callers outside train/ (export, eval)

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
_ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_RANK_FILE = re.compile(r"rank_(\d+)\.pt$")


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


# ----------------------------------------------------------------------------- distributed helpers


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast(obj):
    """rank 0's object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    """Every rank's object, on every rank (small objects: verdicts, file entries)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective(fn, *args):
    """Run fn on rank 0 only; its result or its CheckpointError reaches every rank."""
    rank, _ = _rank_world()
    result = None
    if rank == 0:
        try:
            result = ("ok", fn(*args))
        except (CheckpointError, LockError) as e:
            result = ("error", str(e))
    result = _broadcast(result)
    if result[0] == "error":
        raise CheckpointError(result[1])
    return result[1]


# ----------------------------------------------------------------------------- per-rank state


def rng_state() -> dict:
    """This process's RNG streams as plain data (tensors, lists, numbers): weights-only loadable."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(keys), gauss],
             "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # written by an older hvpmtl (only readable when it came through a trusted path)
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def derived_rng_state(base: dict, rank: int) -> dict:
    """Fresh RNG streams for `rank` of a new world size, derived from a saved state: deterministic,
    different per rank, and no process-global generator is touched."""
    seed = int.from_bytes(hashlib.sha256(base["torch"].numpy().tobytes() + rank.to_bytes(4, "little")).digest()[:8],
                          "little")
    version, keys, gauss = random.Random(seed).getstate()
    _, np_keys, pos, has_gauss, cached = np.random.RandomState(seed % 2**32).get_state(legacy=True)
    return {"python": [version, list(keys), gauss],
            "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.Generator().manual_seed(seed).get_state()}


def redeal_rows(parts: list[Optional[torch.Tensor]], rank: int, world: int, dim: int = 1) -> Optional[torch.Tensor]:
    """Rows of per-rank buffers (the SwAV queue, [views, rows, dim], newest row first) for `rank` of
    `world` new ranks: the old ranks' rows are interleaved by recency, then dealt out round-robin, so
    every new rank holds a share of every age and no row is lost or duplicated."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    n = min(p.shape[dim] for p in parts)
    stacked = torch.stack([p.narrow(dim, 0, n) for p in parts], dim=dim + 1)  # [..., n, old ranks, ...]
    merged = stacked.flatten(dim, dim + 1)  # recency-major: row k of every old rank, then row k+1
    idx = torch.arange(rank, merged.shape[dim], world)
    return merged.index_select(dim, idx).contiguous()


def rank_state_for_world(states: list[dict], rank: int, world: int) -> dict:
    """This rank's state when the checkpoint was written by len(states) ranks and `world` resume it."""
    base = dict(states[rank % len(states)])  # data position: global, the loader maps it to the new sharding
    base["rng"] = derived_rng_state(states[rank % len(states)]["rng"], rank)
    if any(s.get("queue") is not None for s in states):
        base["queue"] = redeal_rows([s.get("queue") for s in states], rank, world)
    return base


# ----------------------------------------------------------------------------- finite state


class NonFiniteState(Exception):
    """The state to be saved holds inf/NaN on some rank: nothing was written."""


def _state_groups(engine, also) -> dict[str, list[torch.Tensor]]:
    """What a checkpoint of `engine` writes, by the name a message uses: the module's weights (each rank's
    full copy), ZeRO's fp32 master partition of this rank (bf16/fp16, and fp32 too), the optimizer's state
    (Adam moments) and the caller's extra modules."""
    opt = engine.optimizer
    masters = getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if masters is None:
        masters = getattr(opt, "fp32_groups_flat_partition", None) or []  # bf16 without ZeRO
    inner = getattr(opt, "optimizer", opt)
    state = [v for s in getattr(inner, "state", {}).values() for v in s.values()
             if torch.is_tensor(v) and v.is_floating_point()]
    groups = {"weights": list(engine.module.parameters()),
              "fp32 master weights": [t for t in masters if torch.is_tensor(t)],
              "optimizer state": state}
    for name, module in also:
        if module is not None:
            groups[name] = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return groups


@torch.no_grad()
def nonfinite_state(engine, also=()) -> str:
    """Collective: '' when every tensor a checkpoint would write is finite on every rank, else which parts are
    not and on how many ranks. `also`: (name, module) pairs (the EMA teacher). One all-reduce, one host read:
    made before saves only, never in a step."""
    from hvpmtl.dist import sum_to_host

    groups = _state_groups(engine, also)
    device = next(engine.module.parameters()).device
    flags = torch.zeros(len(groups), dtype=torch.float64, device=device)
    for i, ts in enumerate(groups.values()):
        bad = [(~torch.isfinite(t)).any().to(device) for t in ts]
        if bad:
            flags[i] = torch.stack(bad).any().double()
    counts = sum_to_host(flags)
    bad = [f"{name} ({int(n)} rank(s))" for name, n in zip(groups, counts) if n > 0]
    return "inf/NaN in " + ", ".join(bad) if bad else ""


def _nonfinite_in_file(path: Path) -> str:
    """'' when every floating tensor stored in the file is finite, else the first key path that is not.
    For checkpoints written before the manifest's weights_finite flag (reads every tensor once)."""
    obj = safe_load.load_torch(path, mmap=True)
    todo = [("", obj)]
    while todo:
        where, x = todo.pop()
        if torch.is_tensor(x):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                return f"{path.name}: inf/NaN in {where.lstrip('.') or 'a tensor'}"
        elif isinstance(x, dict):
            todo += [(f"{where}.{k}", v) for k, v in x.items()]
        elif isinstance(x, (list, tuple)):
            todo += [(f"{where}[{i}]", v) for i, v in enumerate(x)]
    return ""


def check_finite(tag_dir: Path, manifest: dict, names) -> str:
    """'' when the tag's state is finite: its manifest says so, or (a tag from before the flag) the named
    model and optimizer files hold no inf/NaN."""
    flag = manifest.get("weights_finite")
    if flag is False:
        return "its weights are not finite (weights_finite: false in its manifest)"
    if flag is True:
        return ""
    for rel in names:
        if rel == MODEL_FILE or _ZERO_FILE.fullmatch(rel):
            why = _nonfinite_in_file(tag_dir / rel)
            if why:
                return f"its weights are not finite ({why})"
    return ""


# ----------------------------------------------------------------------------- manifest


def _digest(path: Path, fsync: bool = False) -> str:
    with open(path, "rb") as f:
        h = hashlib.file_digest(f, "sha256").hexdigest()
        if fsync:
            os.fsync(f.fileno())
    return h


def read_manifest(tag_dir: Path) -> dict:
    """The manifest of a tag, normalised; ValueError with the reason when there is none or it is unreadable.
    Manifests of hvpmtl before run ids (sizes only) read as run_id None."""
    marker = tag_dir / MANIFEST
    if not marker.is_file():
        raise ValueError("no COMPLETE manifest (the save was interrupted)")
    try:
        m = json.loads(marker.read_text())
        files = m["files"]
        if m.get("format", 1) < 2:  # {name: size}
            m = {"format": 1, "run_id": None, "step": m["step"], "files": {k: {"size": int(v)} for k, v in files.items()},
                 "world_size": sum(1 for k in files if _RANK_FILE.fullmatch(k))}
        for name, e in m["files"].items():
            if not isinstance(e, dict) or "size" not in e:
                raise ValueError(f"bad entry for {name}")
        int(m["step"]), int(m["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable manifest: {e}") from None
    return m


def _needed_by(entry: dict, rank: int) -> bool:
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
        if e.get("sha256") and _digest(p) != e["sha256"]:
            return f"{rel} does not match its checksum (damaged or replaced since it was written)"
        try:
            _parse(p)
        except safe_load.UnsafeFileError as err:
            return str(err)
    return ""


def _parse(path: Path) -> None:
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
            warnings.warn(f"checkpoint {t} is not usable ({why}); trying an older one")
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


# ----------------------------------------------------------------------------- the run


@dataclass
class Choice:
    """The tag every rank agreed to resume from, and what this rank will load."""
    tag_dir: Path
    manifest: dict
    rank_state: dict
    universal_root: Optional[Path] = None  # a converted copy, when the world size changed


@dataclass
class RunState:
    """One run's claim on its output directory: lock, run id and the resume decision."""
    out_dir: Path
    how: str
    run_id: str
    lock: Optional[RunLock] = None
    choice: Optional[Choice] = None
    parent: Optional[str] = None  # run/tag this run was forked from (explicit --resume of an older tag)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(4).hex()


def _manifests(ckpt_dir: Path) -> list[tuple[Path, dict]]:
    out = []
    for t in tag_dirs(ckpt_dir):
        try:
            out.append((t, read_manifest(t)))
        except ValueError:
            pass
    return out


def folder_run_id(ckpt_dir: Path) -> Optional[str]:
    """The run that last wrote here: the one `latest` names, else the newest manifest's; None for none or
    a pre-run-id checkpoint."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        try:
            return read_manifest(ckpt_dir / latest.read_text().strip())["run_id"]
        except (ValueError, OSError):
            pass
    found = _manifests(ckpt_dir)
    return found[-1][1]["run_id"] if found else None


def open_run(out_dir: str | Path, how: str = "auto", *, log=print, lock: bool = True) -> RunState:
    """Claim `out_dir` for this job and decide, once for all ranks, what to resume. Collective: every rank
    calls it after the process group exists and before the model is built (a refusal costs seconds).

    how: 'auto' (this run's newest usable checkpoint, or a fresh start in an unused folder), 'none' (a
    fresh start; refused when the folder holds checkpoints), 'fresh' (start over: the previous run's
    files move to superseded/), or a checkpoint folder / tag name. Raises CheckpointError."""
    out_dir = Path(out_dir)
    rank, world = _rank_world()

    held = None  # rank 0's lock (kept here: only the decision is sent to the other ranks)

    def claim():
        nonlocal held
        held = RunLock(out_dir, log=log).acquire() if lock else None
        try:
            return _decide_mode(out_dir, how, log)
        except BaseException:
            if held is not None:
                held.release()
            raise

    run_id, proposals, parent = _collective(claim)
    run = RunState(out_dir, how, run_id, lock=held, parent=parent)
    try:
        if proposals:
            run.choice = _agree(run, [Path(p) for p in proposals], explicit=how not in RESUME_MODES, log=log)
            if run.run_id is None:  # 'auto' continues the run it resumes (a pre-run-id checkpoint gets a new id)
                run.run_id = run.choice.manifest["run_id"]
        if run.run_id is None:
            run.run_id = _broadcast(new_run_id() if rank == 0 else None)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return run


def _decide_mode(out_dir: Path, how: str, log) -> tuple[Optional[str], list[str], Optional[str]]:
    """rank 0: (run id or None = decided by the resume, tags to propose newest first, parent)."""
    ckpt_dir = out_dir / "checkpoints"
    manifests = _manifests(ckpt_dir)
    if how == "none":
        if manifests:
            raise CheckpointError(
                f"--resume none, but {ckpt_dir} holds checkpoints ({', '.join(t.name for t, _ in manifests[-3:])}) "
                f"of run {manifests[-1][1]['run_id'] or '(no run id)'}. Continue it with --resume auto, or start "
                f"over with --resume fresh (its files move to {out_dir / SUPERSEDED_DIR}/)")
        return new_run_id(), [], None
    if how == "fresh":
        _supersede(out_dir, folder_run_id(ckpt_dir) if manifests else None, log)
        return new_run_id(), [], None
    if how == "auto":
        current = folder_run_id(ckpt_dir)
        mine = [t for t, m in manifests if m["run_id"] == current]
        others = sorted({m["run_id"] or "(no run id)" for t, m in manifests if m["run_id"] != current})
        if others:
            log(f"{ckpt_dir}: ignoring the checkpoints of other runs ({', '.join(others)}); "
                f"this run is {current or '(no run id)'}")
        for t in tag_dirs(ckpt_dir):
            if t not in {x for x, _ in manifests}:
                warnings.warn(f"checkpoint {t} is not usable (no COMPLETE manifest (the save was interrupted)); "
                              "trying an older one")
        return None, [str(t) for t in reversed(mine)], None
    tag = resolve_tag(ckpt_dir, how)
    try:
        m = read_manifest(tag)
    except ValueError as e:
        raise CheckpointError(f"--resume {how}: not a usable checkpoint ({e})") from None
    # continuing the run's newest tag keeps its id; an older one (a rewind) or another folder's forks a new run
    same_folder = tag.parent.resolve() == ckpt_dir.resolve()
    newest = [t for t, x in manifests if x["run_id"] == m["run_id"]][-1:] if same_folder else []
    if same_folder and newest == [tag] and m["run_id"]:
        return m["run_id"], [str(tag)], None
    return new_run_id(), [str(tag)], f"{m['run_id']}/{tag.name}"


def _supersede(out_dir: Path, old_run: Optional[str], log) -> None:
    present = [out_dir / n for n in RUN_FILES if (out_dir / n).exists()]
    if not present:
        return
    dest = out_dir / SUPERSEDED_DIR / f"{old_run or 'unknown-run'}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    dest.mkdir(parents=True)
    for p in present:
        os.replace(p, dest / p.name)  # same file system: a rename, nothing is copied or deleted
    log(f"--resume fresh: the previous run's files ({', '.join(p.name for p in present)}) moved to {dest}")


def _agree(run: RunState, proposals: list[Path], explicit: bool, log) -> Optional[Choice]:
    """Try the proposed tags in order until every rank can load its part of one. Collective."""
    rank, world = _rank_world()
    reasons = []
    for tag_dir in proposals:
        verdict, rank_state = _verify_part(tag_dir, rank, world)
        verdicts = _gather(verdict)
        bad = [f"rank {r}: {v}" for r, v in enumerate(verdicts) if v]
        if not bad:
            choice = Choice(tag_dir, read_manifest(tag_dir), rank_state)
            if choice.manifest["world_size"] != world:
                choice = _convert_for_world(run, choice, rank, world, log)
            return choice
        why = "; ".join(dict.fromkeys(v.split(": ", 1)[1] for v in bad)) if len(set(verdicts)) == 1 else "; ".join(bad)
        reasons.append(f"{tag_dir.name}: {why}")
        if rank == 0:
            warnings.warn(f"checkpoint {tag_dir} could not be loaded ({why}); "
                          + ("it was asked for by name" if explicit else "trying an older one"))
    what = f"--resume {run.how}" if explicit else f"none of the {len(proposals)} checkpoint(s) of this run"
    raise CheckpointError(f"{what} in {run.ckpt_dir} can be loaded: " + " | ".join(reasons) +
                          ". Nothing was loaded and nothing trained. Restore the files, resume an older tag with "
                          "--resume <tag>, or start over with --resume fresh")


def _verify_part(tag_dir: Path, rank: int, world: int) -> tuple[str, Optional[dict]]:
    """('' and this rank's state) when this rank can load its part of the tag, else (why, None)."""
    try:
        m = read_manifest(tag_dir)
    except ValueError as e:
        return str(e), None
    why = check_presence(tag_dir, m)
    if why:
        return why, None
    saved_world = m["world_size"]
    rank_files = [f"rank_{r}.pt" for r in range(saved_world)]
    if any(f not in m["files"] for f in rank_files):
        return f"the manifest lacks a rank file of its {saved_world} ranks", None
    if saved_world == world:
        names = [n for n, e in m["files"].items() if _needed_by(e, rank)]
    else:  # rank 0 converts every file; each rank reads every old rank's state
        names = list(m["files"]) if rank == 0 else rank_files
    why = check_contents(tag_dir, m, names) or check_finite(tag_dir, m, names)
    if why:
        return why, None
    try:
        if saved_world == world:
            return "", safe_load.load_torch(tag_dir / f"rank_{rank}.pt")
        states = [safe_load.load_torch(tag_dir / f) for f in rank_files]
        return "", rank_state_for_world(states, rank, world)
    except (safe_load.UnsafeFileError, KeyError, TypeError) as e:
        return f"rank state unreadable: {e}", None


def _convert_for_world(run: RunState, choice: Choice, rank: int, world: int, log) -> Choice:
    """Re-partition a checkpoint of another world size with DeepSpeed's universal checkpoint converter
    (rank 0), before any engine exists."""
    saved = choice.manifest["world_size"]
    root = run.ckpt_dir / UNIVERSAL_DIR
    out = root / choice.tag_dir.name
    command = (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {choice.tag_dir} "
               f"--output_folder {out} --inject_missing_state")

    def convert():
        log(f"{choice.tag_dir.name} was written by {saved} rank(s), resuming on {world}: converting it "
            f"to a universal checkpoint in {out}")
        shutil.rmtree(out, ignore_errors=True)
        try:
            universal(choice.tag_dir, out)
        except Exception as e:  # noqa: BLE001 — any failure of the converter is a refusal
            raise CheckpointError(f"{choice.tag_dir} was written by {saved} rank(s) and cannot be re-partitioned "
                                  f"for {world} ({type(e).__name__}: {e}). Resume on {saved} rank(s), or convert "
                                  f"it yourself: {command}") from None

    _collective(convert)
    bad = ""
    for p in sorted(out.rglob("*.pt")):  # the converter's output is read by DeepSpeed's own torch.load
        try:
            _parse(p)
        except safe_load.UnsafeFileError as e:
            bad = str(e)
            break
    if any(_gather(bad)):
        raise CheckpointError(f"the universal checkpoint {out} cannot be read safely: {bad or 'on another rank'}")
    choice.universal_root = root
    return choice


def universal(tag_dir: Path, out: Path, workers: int = 1) -> None:
    """DeepSpeed's ZeRO -> universal checkpoint conversion of one tag (files checked weights-only first:
    the converter unpickles them without restriction)."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    for p in sorted(tag_dir.glob("*.pt")):
        _parse(p)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _glob_safe(tag_dir) as src, _glob_safe(out.parent) as dst:
        ds_to_universal.main(Namespace(input_folder=str(src), output_folder=str(dst / out.name),
                                       num_extract_workers=workers, num_merge_workers=workers,
                                       keep_temp_folder=False, strict=True, inject_missing_state=True))
    (out.parent / "latest_universal").unlink(missing_ok=True)  # written by the converter; hvpmtl names tags itself


@contextlib.contextmanager
def _glob_safe(path: Path):
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


# ----------------------------------------------------------------------------- load


def resume(engine, run: RunState, log=print):
    """Load the agreed checkpoint into the engine: (tag_dir, client_state, rank_state), or None for a fresh
    start. Collective. A failure on any rank raises CheckpointError on every rank: the engine may hold a
    partly loaded state and must not train."""
    choice = run.choice
    if choice is None:
        return None
    rank, world = _rank_world()
    error = ""
    client_state = None
    safe_load.install(engine)
    try:
        root = choice.universal_root if choice.universal_root is not None else choice.tag_dir.parent
        engine._config.load_universal_checkpoint = choice.universal_root is not None  # read per call by DeepSpeed
        try:
            with _glob_safe(root) as load_dir:
                path, client_state = engine.load_checkpoint(str(load_dir), tag=choice.tag_dir.name,
                                                            load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = False
        if path is None or client_state is None:
            error = "DeepSpeed found nothing to load"
        elif int(client_state.get("step", -1)) != int(choice.manifest["step"]):
            error = f"it holds step {client_state.get('step')}, its manifest says {choice.manifest['step']}"
    except Exception as e:  # noqa: BLE001 — whatever failed, the engine is now partly loaded
        import traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        error = (f"{type(e).__name__} at {where.filename}:{where.lineno}"
                 f"{': ' + str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}")
    errors = [f"rank {r}: {e}" for r, e in enumerate(_gather(error)) if e]
    if choice.universal_root is not None:
        _barrier()
        if rank == 0:
            shutil.rmtree(choice.universal_root / choice.tag_dir.name, ignore_errors=True)
            try:
                choice.universal_root.rmdir()
            except OSError:
                pass  # not empty: another conversion's leftovers
    if errors:
        raise CheckpointError(f"loading {choice.tag_dir} failed ({'; '.join(errors)}). The model and optimizer may be "
                              "partly loaded, so the run stops here instead of training from a mixed state")
    how = f" ({choice.manifest['world_size']} -> {world} ranks)" if choice.universal_root is not None else ""
    log(f"resumed from {choice.tag_dir}{how}")
    return choice.tag_dir, client_state, choice.rank_state


def rollback(engine, run: RunState, log=print):
    """Reload this run's newest usable, finite checkpoint into a running engine (run.on_nonfinite: rollback):
    (tag_dir, client_state, rank_state), or None when the run has none. Collective, one decision for all
    ranks as at resume; a tag that fails to load on some rank raises CheckpointError (a half-loaded engine
    must not train)."""
    rank, _ = _rank_world()
    mine = [str(t) for t, m in reversed(_manifests(run.ckpt_dir))
            if m["run_id"] == run.run_id and m.get("weights_finite") is not False] if rank == 0 else None
    proposals = [Path(p) for p in _broadcast(mine)]
    if not proposals:
        return None
    run.choice = _agree(run, proposals, explicit=False, log=log)
    try:
        return resume(engine, run, log=lambda msg: log(msg.replace("resumed from", "rolled back to", 1)))
    finally:
        run.choice = None


# ----------------------------------------------------------------------------- save


def save(engine, run: RunState, step: int, client_state: dict, rank_state: dict, keep: int, also=()) -> Path:
    """Every rank calls this. Returns the tag directory once its manifest is written. Raises NonFiniteState
    (on every rank, nothing written) when the state holds inf/NaN on some rank; `also`: (name, module) pairs
    checked with the engine's state (the EMA teacher)."""
    rank, world = _rank_world()
    lost = _broadcast(run.lock.lost if run.lock is not None else None)  # rank 0 holds the lock; all stop together
    if lost:
        raise CheckpointError(f"not writing a checkpoint: {lost}. Another job now owns {run.out_dir}; this one stops")
    bad = nonfinite_state(engine, also)
    if bad:
        raise NonFiniteState(f"not saving step {step}: {bad}")
    ckpt_dir = run.ckpt_dir
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # an interrupted save of this run, or a tag of another run
        _clear_tag(tag_dir, run)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, tag_dir / f"rank_{rank}.pt")
    _barrier()
    entries = {}  # the files this rank wrote: hashed and synced from its own page cache
    for p in sorted(tag_dir.iterdir()):
        z, r = _ZERO_FILE.fullmatch(p.name), _RANK_FILE.fullmatch(p.name)
        owner = int((z or r).group(1)) if (z or r) else 0
        if owner == rank and p.is_file():
            entries[p.name] = {"size": p.stat().st_size, "sha256": _digest(p, fsync=True),
                               "ranks": [owner] if (z or r) else "all"}
    gathered = _gather(entries)

    def commit():
        files = {k: v for part in gathered for k, v in part.items()}
        need = [f"rank_{r}.pt" for r in range(world)] + [MODEL_FILE]
        missing = [n for n in need if n not in files]
        zero_ranks = {int(_ZERO_FILE.fullmatch(n).group(1)) for n in files if _ZERO_FILE.fullmatch(n)}
        if zero_ranks and zero_ranks != set(range(world)):
            missing.append(f"optimizer partitions of ranks {sorted(set(range(world)) - zero_ranks)}")
        if missing:
            raise CheckpointError(f"checkpoint {tag_dir} is incomplete after saving (missing {', '.join(missing)}); "
                                  "it was not marked COMPLETE")
        manifest = {"format": MANIFEST_FORMAT, "run_id": run.run_id, "step": step, "world_size": world,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
                    "parent": run.parent, "weights_finite": True, "files": dict(sorted(files.items()))}
        _write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        _write_atomic(ckpt_dir / "latest", tag)
        prune(ckpt_dir, run.run_id, tag_dir, keep)

    _collective(commit)
    return tag_dir


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def _clear_tag(tag_dir: Path, run: RunState) -> None:
    try:
        owner = read_manifest(tag_dir)["run_id"]
    except ValueError:
        owner = run.run_id  # no manifest: debris of an interrupted save
    if owner == run.run_id:
        shutil.rmtree(tag_dir)
        return
    dest = run.out_dir / SUPERSEDED_DIR / f"{owner or 'unknown-run'}" / "checkpoints"
    dest.mkdir(parents=True, exist_ok=True)
    os.replace(tag_dir, dest / tag_dir.name)


def prune(ckpt_dir: Path, run_id: str, just_written: Path, keep: int) -> list[Path]:
    """Keep this run's newest `keep` complete tags up to the one just written (always kept); remove its other
    tags and the manifest-less debris of crashed saves older than it. Other runs' tags are never touched.
    Returns the folders removed."""
    removed = []
    own_ok = []
    limit = step_of(just_written)
    for t in tag_dirs(ckpt_dir):
        if t == just_written:
            continue
        try:
            m = read_manifest(t)
        except ValueError:
            if step_of(t) < limit:
                removed.append(t)
            continue
        if m["run_id"] != run_id:
            continue
        if step_of(t) < limit and not check_presence(t, m):
            own_ok.append(t)
        else:  # damaged, or later than the tag just written (passed over when this run resumed)
            removed.append(t)
    removed += own_ok[:max(0, len(own_ok) - (keep - 1))]
    for t in removed:
        shutil.rmtree(t, ignore_errors=True)
    return removed


# ----------------------------------------------------------------------------- reading weights

TIMM_PREFIX = "backbone.model."  # where the timm model sits inside Student and Teacher
TEACHER_MAX_INIT_SHARE = 0.01


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
        why = check_contents(tag_dir, m, [n for n in m["files"] if _ZERO_FILE.fullmatch(n)])
        if why:
            raise CheckpointError(f"{tag_dir}: not a usable checkpoint ({why})")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with _glob_safe(tag_dir.parent) as parent:
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


def teacher_init_share(cfg, step: int) -> tuple[float, bool]:
    """How much of the EMA teacher is still its random start after `step` updates: the product of the
    momenta (hvpmtl.train.schedules.momentum_schedule). Exact for a constant momentum or a cosine schedule
    of known length; else the constant lower bound m^step (second value False)."""
    from hvpmtl.train.schedules import momentum_schedule

    d, o = cfg.objectives.distill, cfg.optim
    if d.momentum_schedule == "constant":
        return d.momentum ** step, True
    total = o.max_steps or (o.epochs * o.steps_per_epoch if o.steps_per_epoch else 0)
    if not total:
        return d.momentum ** step, False
    m = momentum_schedule(d, total, length=step)
    return math.exp(sum(math.log(max(m[t], 1e-300)) for t in range(1, step + 1))), True


def default_weights(cfg, step: int, has_teacher: bool) -> tuple[str, str]:
    """('teacher' | 'student', why): the teacher only once less than TEACHER_MAX_INIT_SHARE of it is its random
    initialisation; before that the student is the better-founded backbone."""
    if not has_teacher:
        return "student", "no EMA teacher in this run (distillation off)"
    share, exact = teacher_init_share(cfg, step)
    bound = "" if exact else " at least"
    if share < TEACHER_MAX_INIT_SHARE:
        return "teacher", f"after {step} steps{bound} {share:.2%} of the EMA teacher is its random start"
    return "student", (f"after {step} steps{bound} {share:.0%} of the EMA teacher is still its random start "
                       f"(the teacher is used below {TEACHER_MAX_INIT_SHARE:.0%})")


def read_backbone(run_dir: str | Path, checkpoint: Optional[str | Path] = None, which: str = "auto"):
    """A pre-training run's backbone: (timm state dict fp32, the run's config, info). `checkpoint` is a tag
    folder or a tag name (default: the newest complete one); `which` auto|teacher|student — auto picks by
    `default_weights`. info says which weights, from which tag and step, and why."""
    from hvpmtl.config import load_config

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


# ----------------------------------------------------------------------------- exported backbone files


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
