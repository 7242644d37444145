"""The shared run.output_dir: rank 0 makes it (as training does) and writes a probe file; every rank must read
that probe and write its own into the same directory (ZeRO checkpoints are written by all ranks), which rank 0
must see. Each probe's mtime, set by the file system (the server's clock on NFS), measures the rank's clock
against the one the run lock's heartbeats are judged by."""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Optional

from hvpmtl.fileio import fsync_file

PROBE_PREFIX = ".hvpmtl-doctor-"


def probe_name(nonce: str, rank: int) -> str:
    return f"{PROBE_PREFIX}{nonce}-rank{rank}"


def write_probe(directory: Path, nonce: str, rank: int) -> tuple[Optional[float], str]:
    """Write this rank's probe file (fsync'ed); (its mtime minus this rank's clock at the write, '') or
    (None, why it could not be written). The mtime comes from the file system (the server's clock on NFS), the
    clock the run lock's heartbeats are judged by."""
    path = directory / probe_name(nonce, rank)
    try:
        before = time.time()
        with open(path, "w") as f:
            f.write(nonce)
            fsync_file(f)
        after = time.time()
        return os.stat(path).st_mtime - (before + after) / 2, ""
    except OSError as e:
        return None, f"cannot write {path}: {e.strerror or e}"


def read_probe(directory: Path, nonce: str, rank: int) -> str:
    """'' when rank `rank`'s probe is there with the right content, else what is wrong."""
    path = directory / probe_name(nonce, rank)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return f"{path} (written by rank {rank}) is not there"
    except OSError as e:
        return f"cannot read {path} (written by rank {rank}): {e.strerror or e}"
    return "" if text == nonce else f"{path} (written by rank {rank}) holds {text[:40]!r}, not what was written"


def check_output_dir(out_dir: Path, rank: int, world: int, dist) -> tuple[dict, bool, str]:
    """Every rank, out_dir absolute: (the record's `output_dir`, whether rank 0 made the directory, the probes'
    nonce). Collective."""
    o: dict = {"path": str(out_dir), "errors": []}
    made, shared = False, [None, False]  # [nonce, rank 0 wrote its probe]
    if rank == 0:
        shared[0] = secrets.token_hex(6)
        try:
            made = not out_dir.exists()
            out_dir.mkdir(parents=True, exist_ok=True)
            o["mtime_offset_s"], err = write_probe(out_dir, shared[0], 0)
        except OSError as e:
            made, err = False, f"cannot create {out_dir}: {e.strerror or e}"
        shared[1] = not err
        if err:
            o["errors"].append(err)
            o["write_error"] = err
    if world > 1:
        dist.broadcast_object_list(shared, src=0)
    nonce, rank0_wrote = shared
    if rank != 0:
        err = read_probe(out_dir, nonce, 0) if rank0_wrote else ""
        if err:
            o["errors"].append(f"does not see rank 0's file: {err}: run.output_dir must be one shared directory")
        o["mtime_offset_s"], err = write_probe(out_dir, nonce, rank)
        if err:
            o["errors"].append(err)
            o["write_error"] = err
    if world > 1:
        dist.barrier()
    if rank == 0:
        o["unseen"] = [r for r in range(1, world) if read_probe(out_dir, nonce, r)]
    return o, made, nonce


def remove_probes(out_dir: Path, nonce: str, rank: int, world: int, made: bool, dist) -> None:
    """Every rank removes its own probe (once rank 0 has read them all); the doctor leaves no empty run folder
    behind (training makes it again). Collective."""
    try:
        (out_dir / probe_name(nonce, rank)).unlink(missing_ok=True)
    except OSError:
        pass
    if world > 1:
        dist.barrier()
    if made:
        try:
            out_dir.rmdir()
        except OSError:
            pass
