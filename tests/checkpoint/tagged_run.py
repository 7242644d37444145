"""Helpers of the checkpoint tests: damaging a hard-linked copy of a run folder without touching the original,
resealing a manifest, planting a payload. The tagged run itself is conftest.py's `trainer` fixture."""
import json
import os
from pathlib import Path

import torch

from hvpmtl import checkpoint as ck
from hvpmtl.fileio import sha256_file

STEPS = (2, 4, 6)  # the tags of the session's run (conftest.py)


def rewrite(path: Path, text: str) -> None:
    path.unlink()  # a hard-linked copy: never write through to the original
    path.write_text(text)


def reseal(tag: Path) -> None:
    """Rewrite a manifest for the files as they are now (what someone who 'repairs' a checkpoint does)."""
    m = json.loads((tag / "COMPLETE").read_text())
    for name, e in m["files"].items():
        e["size"] = (tag / name).stat().st_size
        e["sha256"] = sha256_file(tag / name)
    rewrite(tag / "COMPLETE", json.dumps(m))


def damage(path: Path, how: str) -> None:
    """Damage a file of a hard-linked copy without touching the original inode."""
    data = bytearray(path.read_bytes())
    path.unlink()
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip":  # same size, one byte in the middle
        data[len(data) // 2] ^= 0xFF
    elif how == "missing":
        return
    path.write_bytes(bytes(data))


def open_quietly(out, how="auto"):
    run = ck.open_run(out, how, log=lambda m: None)
    if run.lock is not None:
        run.lock.release()
    return run


class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint or backbone file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, keep_keys=True) -> None:
    """Replace a torch file by one that holds the same data plus a payload."""
    obj = ck.safe_load.load_torch(path) if keep_keys else {}
    obj["innocent"] = Payload(marker)
    path.unlink()
    torch.save(obj, path)


def drop_finite_flag(tag: Path) -> None:
    """The tag's manifest resealed without the weights_finite flag (a development version's format)."""
    m = json.loads((tag / "COMPLETE").read_text())
    m.pop("weights_finite")
    rewrite(tag / "COMPLETE", json.dumps(m))
    reseal(tag)
