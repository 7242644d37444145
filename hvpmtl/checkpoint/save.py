"""Writing a run checkpoint, and pruning the run's older ones.

Every rank writes its DeepSpeed files and its rank_<r>.pt, then hashes and syncs the files it wrote itself
(still in its page cache, so a save costs no extra read over the network); rank 0 gathers the entries,
writes the manifest (COMPLETE) and then `latest`, each atomically, and prunes. Only a finite state is
written (finite.py), and a job that lost its run lock writes nothing.

Pruning keeps the newest `keep` complete tags of this run (never the one just written) and removes only
this run's older tags and the debris of crashed saves; other runs' tags are left alone.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import hvpmtl.checkpoint.safe_load as safe_load
from hvpmtl.checkpoint.finite import NonFiniteState, nonfinite_state
from hvpmtl.checkpoint.manifest import (MANIFEST, MANIFEST_FORMAT, MODEL_FILE, RANK_FILE, SUPERSEDED_DIR, ZERO_FILE,
                                        CheckpointError, check_presence, rank0_decides, read_manifest, step_of,
                                        tag_dirs, tag_for)
from hvpmtl.checkpoint.run import RunState
from hvpmtl.dist import barrier, broadcast_object, gather_objects, rank_world
from hvpmtl.fileio import atomic_write, sha256_file, torch_save


def save(engine, run: RunState, step: int, client_state: dict, rank_state: dict, keep: int, also=()) -> Path:
    """Every rank calls this. Returns the tag directory once its manifest is written. Raises NonFiniteState
    (on every rank, nothing written) when the state holds inf/NaN on some rank; `also`: (name, module) pairs
    checked with the engine's state (the EMA teacher)."""
    rank, world = rank_world()
    lost = broadcast_object(run.lock.lost if run.lock is not None else None)  # rank 0 holds the lock; all stop together
    if lost:
        raise CheckpointError(f"not writing a checkpoint: {lost}; this job stops so that two jobs never write "
                              f"{run.out_dir}")
    bad = nonfinite_state(engine, also)
    if bad:
        raise NonFiniteState(f"not saving step {step}: {bad}")
    ckpt_dir = run.ckpt_dir
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # an interrupted save of this run, or a tag of another run
        _clear_tag(tag_dir, run)
    barrier()
    safe_load.install(engine)  # its save writes through a Python file: a full disk is an OSError naming the file
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch_save(rank_state, tag_dir / f"rank_{rank}.pt")
    barrier()
    entries = {}  # the files this rank wrote: hashed and synced from its own page cache
    for p in sorted(tag_dir.iterdir()):
        z, r = ZERO_FILE.fullmatch(p.name), RANK_FILE.fullmatch(p.name)
        owner = int((z or r).group(1)) if (z or r) else 0
        if owner == rank and p.is_file():
            entries[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p, fsync=True),
                               "ranks": [owner] if (z or r) else "all"}
    gathered = gather_objects(entries)

    def commit():
        files = {k: v for part in gathered for k, v in part.items()}
        need = [f"rank_{r}.pt" for r in range(world)] + [MODEL_FILE]
        missing = [n for n in need if n not in files]
        zero_ranks = {int(ZERO_FILE.fullmatch(n).group(1)) for n in files if ZERO_FILE.fullmatch(n)}
        if zero_ranks and zero_ranks != set(range(world)):
            missing.append(f"optimizer partitions of ranks {sorted(set(range(world)) - zero_ranks)}")
        if missing:
            raise CheckpointError(f"checkpoint {tag_dir} is incomplete after saving (missing {', '.join(missing)}); "
                                  "it was not marked COMPLETE")
        manifest = {"format": MANIFEST_FORMAT, "run_id": run.run_id, "step": step, "world_size": world,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
                    "parent": run.parent, "weights_finite": True, "files": dict(sorted(files.items()))}
        atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1), f".{MANIFEST}.tmp")
        atomic_write(ckpt_dir / "latest", tag, ".latest.tmp")
        prune(ckpt_dir, run.run_id, tag_dir, keep)

    rank0_decides(commit)
    return tag_dir


def _clear_tag(tag_dir: Path, run: RunState) -> None:
    try:
        owner = read_manifest(tag_dir)["run_id"]
    except ValueError:  # no manifest: debris of an interrupted save; an unreadable one: nobody known
        owner = "unknown-run" if (tag_dir / MANIFEST).exists() else run.run_id
    if owner == run.run_id:
        shutil.rmtree(tag_dir)
        return
    dest = run.out_dir / SUPERSEDED_DIR / owner / "checkpoints"
    dest.mkdir(parents=True, exist_ok=True)
    os.replace(tag_dir, dest / tag_dir.name)


def prune(ckpt_dir: Path, run_id: str, just_written: Path, keep: int) -> list[Path]:
    """Keep this run's newest `keep` complete tags up to the one just written (always kept); remove its other
    tags and the manifest-less debris of crashed saves older than it. Other runs' tags, and tags whose manifest
    is unreadable (damaged, or of another checkpoint format), are never touched. Returns the folders removed."""
    removed = []
    own_ok = []
    limit = step_of(just_written)
    for t in tag_dirs(ckpt_dir):
        if t == just_written:
            continue
        try:
            m = read_manifest(t)
        except ValueError:
            if step_of(t) < limit and not (t / MANIFEST).exists():
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
