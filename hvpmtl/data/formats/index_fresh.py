"""Whether a data index is the index of its source as it is now, and the start-up path that opens it (or
builds a small one, one process per file system, while the others wait).

A list index is keyed by the list file's size, mtime and sha256: size and mtime equal -> fresh; the
size equal but the mtime not (a copy without -p) -> the content hash decides. A shard index is keyed
by manifest.json's hash and the size and mtime of every tar, DALI index and labels.npz. A missing
or stale index is built by `hvpmtl data index` (offline, once per data set), by `to-shards` and
`validate`, or at training start-up for small data sets (data.index_auto_build samples at most),
by one process per file system under a lock file while the others wait (see ensure_index).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from hvpmtl.data.formats.index_build import (clean_leftovers, index_lock, shard_sources, write_list_index,
                                             write_shard_index)
from hvpmtl.data.formats.index_file import DataIndex
from hvpmtl.data.formats.index_format import default_index_path, is_int
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.formats.shards import MANIFEST
from hvpmtl.fileio import sha256_file


# ----------------------------------------------------------------------------- fresh or stale


def staleness(index: DataIndex, source: str | os.PathLike, num_classes: Optional[int]) -> str:
    """'' when `index` is the index of `source` as it is now (and fits num_classes), else why not."""
    h = index.header
    if num_classes is not None and h.get("num_classes") not in (None, num_classes):
        return f"it was built for {h['num_classes']} classes, data.num_classes is {num_classes}"
    if num_classes is not None and h.get("num_classes") is None and h.get("max_class", -1) >= num_classes:
        return f"it holds class index {h['max_class']} >= data.num_classes {num_classes}"
    source = Path(source)
    key = h.get("key")
    if not isinstance(key, dict) or not all(is_int(key.get(k)) for k in ("size", "mtime_ns")) and \
            h["kind"] == "list" or h["kind"] == "shards" and not isinstance(key.get("manifest"), dict):
        return "its record of the source (key) is damaged"
    if h["kind"] == "list":
        try:
            st = os.stat(source)
        except OSError as e:
            raise DataError(f"cannot read list file {source}: {e.strerror}") from None
        if st.st_size != key["size"]:
            return f"{source} has changed (size {st.st_size}, indexed {key['size']})"
        if st.st_mtime_ns != key["mtime_ns"] and sha256_file(source) != key["sha256"]:
            return f"{source} has changed (content hash)"
        return ""
    try:
        manifest = json.loads((source / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{source / MANIFEST} is missing or unreadable"
    now = shard_sources(source, manifest, content_hash=False)
    old = h["key"]
    m = now["manifest"]
    if m["size"] != old["manifest"]["size"] or (m["mtime_ns"] != old["manifest"]["mtime_ns"] and
                                                 sha256_file(source / MANIFEST) != old["manifest"]["sha256"]):
        return f"{source / MANIFEST} has changed"
    for name, v in now["files"].items():
        if v != old["files"].get(name):
            return f"{source / name} has changed since it was indexed (size or mtime)"
    return ""


def up_to_date(index_path: Path, kind: str, source, num_classes: Optional[int], progress=None) -> str:
    """'' when the index at `index_path` is exactly what building it now would give (the source's
    content hash recomputed, not trusting size and mtime; the same num_classes; the checksum and
    invariants verified), else why not. What `hvpmtl data index` checks before it rebuilds."""
    try:
        idx = DataIndex(index_path)
    except DataError as e:
        return str(e)
    try:
        if idx.kind != kind:
            return f"it indexes {idx.kind}, not {kind}"
        if idx.header.get("num_classes") != num_classes:
            return f"it was built for num_classes {idx.header.get('num_classes')}, not {num_classes}"
        why = staleness(idx, source, num_classes)
        if not why and kind == "list" and sha256_file(source) != idx.header["key"].get("sha256"):
            why = f"{source}'s content differs from what was indexed (although its size and mtime match)"
        if not why:
            problems = idx.verify(progress)
            why = "damaged: " + "; ".join(problems) if problems else ""
        return why
    finally:
        idx.close()


def index_command(kind: str, source: str | os.PathLike, num_classes: Optional[int], out: Optional[str] = None) -> str:
    what = f"--list {source}" if kind == "list" else f"--shards {source}"
    cls = f" --num-classes {num_classes}" if num_classes is not None else ""
    o = f" --out {out}" if out else ""
    return f"hvpmtl data index {what}{cls}{o}"


def open_fresh(index_path: Path, kind: str, source, num_classes,
               verify: bool = False) -> tuple[Optional[DataIndex], str]:
    """(the index, '') when it is usable for `source`, else (None, why not). `verify`: also read it
    whole (checksum and invariants; offline callers)."""
    try:
        idx = DataIndex(index_path)
    except DataError as e:
        return None, str(e)
    if idx.kind != kind:
        return None, f"{index_path} indexes {idx.kind}, not {kind}"
    why = staleness(idx, source, num_classes)
    if not why and verify:
        problems = idx.verify()
        why = "damaged: " + "; ".join(problems) if problems else ""
    if why:
        idx.close()
        return None, f"{index_path} is stale: {why}"
    return idx, ""


def count_samples(kind: str, source: Path, limit: int) -> int:
    """How many samples the source holds, counting no further than limit + 1 (a list file's lines)."""
    if kind == "shards":
        try:
            return int(json.loads((source / MANIFEST).read_text()).get("num_samples", 0))
        except (OSError, ValueError):
            return 0
    n = 0
    try:
        with open(source, "rb") as f:
            while n <= limit and (chunk := f.read(8 << 20)):
                n += chunk.count(b"\n")
    except OSError as e:
        raise DataError(f"cannot read list file {source}: {e.strerror}") from None
    return n


def ensure_index(kind: str, source: str | os.PathLike, *, index_path: str | os.PathLike | None = None,
                 num_classes: Optional[int] = None, auto_build_max: int = 1_000_000, wait_s: float = 600.0,
                 builder: bool = True, log: Callable[[str], None] = print, verify: bool = False) -> DataIndex:
    """The fresh index of a list file (kind 'list') or shard folder ('shards').

    Missing or stale: a DataError naming the command to run, unless the source has at most
    `auto_build_max` samples; then one process builds it under the build lock (a HeartbeatLock: a dead
    holder's lock is taken over at once, a killed build's leftovers are removed) and the others poll
    for the renamed file. Only processes with `builder` (one per node: local rank 0) try the lock, so
    one process per file system builds: node-local or shared alike. A failed build leaves
    `<index>.failed` with its message, which the waiting processes raise; waiting longer than
    `wait_s` for a live builder is a DataError naming it. `verify`: a damaged index (checksum) is
    stale too (the validator).
    """
    source = Path(source)
    path = Path(index_path) if index_path else default_index_path(source)
    idx, why = open_fresh(path, kind, source, num_classes, verify)
    if idx is not None:
        return idx
    cmd = index_command(kind, source, num_classes, str(path) if index_path else None)
    if auto_build_max <= 0 or count_samples(kind, source, auto_build_max) > auto_build_max:
        raise DataError(f"{why}.\nBuild the data index once with `{cmd}` (data sets of more than "
                        f"data.index_auto_build={auto_build_max} samples are not indexed at start-up).")
    lock, failed = index_lock(path.with_name(path.name + ".lock"), log), path.with_name(path.name + ".failed")
    start, t0 = time.monotonic(), time.time()
    while True:
        if builder:
            try:
                got = lock.try_acquire()
            except OSError as e:
                raise DataError(f"cannot create {lock.path} to build the data index: {e.strerror}; build it with "
                                f"`{cmd}` or set data.index to a writable place") from None
            if got:
                try:
                    # another node may just have built it
                    idx, why = open_fresh(path, kind, source, num_classes, verify)
                    if idx is None:
                        failed.unlink(missing_ok=True)
                        clean_leftovers(path, log)
                        log(f"building the data index {path} ({why})")
                        t = time.perf_counter()
                        try:
                            if kind == "list":
                                write_list_index(source, path, num_classes=num_classes)
                            else:
                                write_shard_index(source, path)
                        except DataError as e:
                            with contextlib.suppress(OSError):
                                failed.write_text(str(e))
                            raise
                        log(f"data index {path} built in {time.perf_counter() - t:.1f} s")
                        idx, why = open_fresh(path, kind, source, num_classes)
                        if idx is None:
                            raise DataError(f"the data index {path} was built but is not usable: {why}")
                    return idx
                finally:
                    lock.release()
        idx, _ = open_fresh(path, kind, source, num_classes)
        if idx is not None:
            return idx
        try:
            if failed.stat().st_mtime >= t0 - 1:
                raise DataError(failed.read_text(errors="replace"))
        except FileNotFoundError:
            pass
        if time.monotonic() - start > wait_s:
            raise DataError(f"waited {wait_s:.0f} s for the data index {path}, being built by {lock.holder()} "
                            f"(lock {lock.path}); if that build is hung, stop it; or build the index with `{cmd}`")
        time.sleep(0.2)
