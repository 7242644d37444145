"""Building the data index (the format: index_format.py): from a list file (the one list parse, streamed to
disk) or from a shard folder's manifest, labels.npz and DALI index files; the validator's verdicts written
in; the build lock and what killed builds leave behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import pyarrow as pa

from hvpmtl.data.formats.index_file import DataIndex
from hvpmtl.data.formats.index_format import CHUNK_ROWS, FIRST_ERROR, UNCHECKED, Streamed, default_index_path, temp_name
from hvpmtl.data.formats.index_write import write_index_file
from hvpmtl.data.formats.issues import CODES, DataError, Issue
from hvpmtl.data.formats.list_parse import iter_list_blocks, list_issues
from hvpmtl.data.formats.shards import LABELS, MANIFEST, load_shard_set, read_index, sample_key, samples_end
from hvpmtl.fileio import sha256_file
from hvpmtl.locks import HeartbeatLock, process_alive


def file_key(path: str | os.PathLike, content_hash: bool = True) -> dict:
    st = os.stat(path)
    key = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if content_hash:
        key["sha256"] = sha256_file(path)
    return key


def _issue_rows(issues: list[Issue], files: list[str]) -> list:
    """The issues as the index stores them: [code, file number in `files`, line, detail, path]."""
    fid = {f: i for i, f in enumerate(files)}
    return [[i.code, fid[i.file], int(i.line), i.message, i.path] for i in issues]


def _detail(issue: Issue) -> Issue:
    """Stored issues keep their detail only: make_issue adds the advice again when they are read."""
    advice = CODES[issue.code][1]
    msg = issue.message
    detail = msg[:-len(advice) - 2] if msg.endswith("; " + advice) else ("" if msg == advice else msg)
    return Issue(issue.code, issue.file, issue.line, detail, issue.path)


def _smallest_int(max_value: int):
    return np.int32 if max_value < 2**31 else np.int64


# ----------------------------------------------------------------------------- building from a list file


@contextlib.contextmanager
def build_lock(index_path: Path, wait_s: float = 600.0, log: Callable[[str], None] = print):
    """Hold the index's build lock (waiting up to wait_s for a live builder; a dead one's lock is taken
    over) and clear what killed builds left beside it."""
    lock = index_lock(index_path.with_name(index_path.name + ".lock"), log)
    start = time.monotonic()
    while True:
        try:
            if lock.try_acquire():
                break
        except OSError as e:
            raise DataError(f"cannot create {lock.path} to build the data index: {e.strerror}; write the index "
                            "to a writable place (--out, or data.index)") from None
        if time.monotonic() - start > wait_s:
            raise DataError(f"{index_path} is being built by {lock.holder()} (lock {lock.path}) for more than "
                            f"{wait_s:.0f} s; wait for it, or stop that build")
        time.sleep(0.2)
    try:
        clean_leftovers(index_path, log)
        yield lock
    finally:
        lock.release()


def build_list_index(list_file: str | os.PathLike, out: str | os.PathLike | None = None, *,
                     num_classes: Optional[int] = None, progress=None, threads: Optional[int] = None,
                     wait_s: float = 600.0, log: Callable[[str], None] = print) -> Path:
    """Parse a list file (streaming, vectorised) into its index, under the index's build lock;
    returns the index path. Peak memory: a few parse blocks plus the duplicate-path check."""
    out = Path(out) if out else default_index_path(list_file)
    with build_lock(out, wait_s, log):
        return write_list_index(list_file, out, num_classes=num_classes, progress=progress, threads=threads)


def write_list_index(list_file: str | os.PathLike, out: Path, *, num_classes: Optional[int] = None, progress=None,
                     threads: Optional[int] = None) -> Path:
    """build_list_index without the lock (its holder calls this)."""
    src = Path(list_file)
    try:
        before = os.stat(src)
    except OSError as e:
        raise DataError(f"cannot read list file {src}: {e.strerror}") from None
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=temp_name(out, "build") + "-", dir=out.parent))
    except OSError as e:
        raise DataError(f"cannot write the data index beside {out}: {e.strerror}; write it to a writable place "
                        "(--out, or data.index)") from None
    try:
        names = ("paths", "plens", "lines", "counts", "classes", "confs", "codes", "hashes")
        files = {k: open(tmpdir / k, "wb") for k in names}
        h = hashlib.sha256()
        issues: list[Issue] = []
        n_lines = rows = 0
        table: dict[float, int] = {}  # distinct confidences, in order of appearance

        def on_read(chunk: bytes) -> None:
            h.update(chunk)
            if progress is not None:
                progress.add(len(chunk))
        for b in iter_list_blocks(src, num_classes, threads=threads, on_read=on_read):
            if len(b.paths):
                paths = b.paths.cast(pa.large_binary())
                off = np.frombuffer(paths.buffers()[1], np.int64)[paths.offset:paths.offset + len(paths) + 1]
                files["paths"].write(memoryview(paths.buffers()[2])[off[0]:off[-1]])
                files["plens"].write(np.diff(off).astype(np.int64).tobytes())
            files["lines"].write(b.lines.astype(np.int64).tobytes())
            files["counts"].write(b.counts.astype(np.int64).tobytes())
            files["classes"].write(b.classes.astype(np.int32).tobytes())
            files["confs"].write(b.confs.astype(np.float32).tobytes())
            files["hashes"].write(b.hashes.tobytes())
            if len(table) <= 256 and b.conf_codes is not None:
                lut = np.asarray([table.setdefault(float(v), len(table)) for v in b.conf_values], np.uint16)
                files["codes"].write(lut[b.conf_codes].tobytes())
            issues += b.issues
            n_lines += b.num_lines
            rows += len(b.lines)
        for f in files.values():
            f.close()
        after = os.stat(src)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise DataError(f"{src} changed while it was being indexed; run the command again")
        mm = {k: np.memmap(tmpdir / k, dt, "r") if os.path.getsize(tmpdir / k) else np.zeros(0, dt)
              for k, dt in (("paths", np.uint8), ("plens", np.int64), ("lines", np.int64), ("counts", np.int64),
                            ("classes", np.int32), ("confs", np.float32), ("codes", np.uint16),
                            ("hashes", np.uint64))}
        path_off = np.zeros(rows + 1, np.int64)
        np.cumsum(mm["plens"], out=path_off[1:])
        keep, issues = list_issues(str(src), issues, n_lines, mm["lines"], mm["hashes"],
                                   lambda r: bytes(mm["paths"][path_off[r]:path_off[r + 1]]))
        issues = [_detail(i) for i in issues]
        header = {"kind": "list", "source": str(src.resolve()),
                  "key": {"path": str(src.resolve()), "size": before.st_size, "mtime_ns": before.st_mtime_ns,
                          "sha256": h.hexdigest()},
                  "num_classes": num_classes, "num_lines": n_lines}
        codes = (mm["codes"], list(table)) if len(table) <= 256 and len(mm["codes"]) == len(mm["confs"]) else None
        arrays = _sample_arrays(header, mm["paths"], path_off, mm["lines"], mm["counts"], mm["classes"],
                                mm["confs"], keep, codes)
        header["issue_files"] = [str(src)]
        header["issue_counts"] = _count_codes(issues)
        return write_index_file(out, header, arrays, _issue_rows(issues, header["issue_files"]))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _count_codes(issues: list[Issue]) -> dict:
    out: dict = {}
    for i in issues:
        out[i.code] = out.get(i.code, 0) + 1
    return out


def _sample_arrays(header: dict, blob: np.ndarray, path_off: np.ndarray, lines: np.ndarray, counts: np.ndarray,
                   classes: np.ndarray, confs: np.ndarray, keep: np.ndarray, codes=None) -> dict:
    """The per-sample arrays of the rows `keep`, streamed in chunks; fills the header's counts.
    `codes`: (uint16 codes of every label, the distinct confidences they number), when known."""
    rows = len(keep)
    kept = np.flatnonzero(keep) if not keep.all() else None
    n = rows if kept is None else len(kept)
    label_off = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=label_off[1:])
    k_counts = counts if kept is None else counts[kept]
    k_plens = np.diff(path_off) if kept is None else (path_off[kept + 1] - path_off[kept])
    nnz, blob_len = int(np.sum(k_counts)), int(np.sum(k_plens))
    # confidences: one byte into a table of the distinct values when there are few (Tencent: 1, 0.9, 0.8)
    if codes is None and len(confs):
        values, inverse = np.unique(confs, return_inverse=True)
        codes = (inverse.astype(np.uint16), values.tolist()) if len(values) <= 256 else None
    elif codes is None:
        codes = (np.zeros(0, np.uint16), [])
    table = sorted(codes[1]) if codes is not None else None
    remap = np.asarray([table.index(v) for v in codes[1]], np.uint8) if codes is not None else None
    max_class = -1
    for i in range(0, len(classes), CHUNK_ROWS * 8):
        max_class = max(max_class, int(classes[i:i + CHUNK_ROWS * 8].max()))
    max_labels = max((int(k_counts[i:i + CHUNK_ROWS * 8].max()) for i in range(0, n, CHUNK_ROWS * 8)), default=0)
    header.update(num_samples=n, nnz=nnz, conf_table=table, max_class=max_class, max_labels=max_labels,
                  **verdict_stats(np.zeros(0, np.uint8), np.zeros(0, np.uint16), np.zeros(0, np.uint16), n))

    def rows_chunks():
        for s in range(0, n, CHUNK_ROWS):
            yield (np.arange(s, min(n, s + CHUNK_ROWS)) if kept is None else kept[s:s + CHUNK_ROWS])

    def segments(offsets, values, convert=None):
        def gen():
            for r in rows_chunks():
                if kept is None:  # a contiguous run of rows
                    seg = values[int(offsets[r[0]]):int(offsets[r[-1] + 1])]
                else:
                    seg = values[_positions(offsets, r)]
                yield convert(seg) if convert else seg
        return gen

    def cumulative(lengths_of, dtype):
        def gen():
            total = 0
            yield np.zeros(1, dtype)
            for r in rows_chunks():
                c = np.cumsum(lengths_of(r)) + total
                total = int(c[-1]) if len(c) else total
                yield c.astype(dtype)
        return gen

    off_dt = _smallest_int(blob_len)
    ptr_dt = _smallest_int(nnz)
    if table is not None:
        conf_arr = Streamed(np.uint8, nnz, segments(label_off, codes[0], lambda c: remap[c]))
    else:
        conf_arr = Streamed(np.float32, nnz, segments(label_off, confs))
    line_dt = _smallest_int(int(lines.max()) if len(lines) else 0)
    whole = kept is None and len(blob) == blob_len and len(classes) == nnz  # every row: the inputs as they are
    return {
        "path_offsets": Streamed(off_dt, n + 1, cumulative(lambda r: path_off[r + 1] - path_off[r], off_dt)),
        "path_blob": blob if whole else Streamed(np.uint8, blob_len, segments(path_off, blob)),
        "lines": Streamed(line_dt, n, lambda: (lines[r].astype(line_dt) for r in rows_chunks())),
        "indptr": Streamed(ptr_dt, n + 1, cumulative(lambda r: counts[r], ptr_dt)),
        "classes": np.asarray(classes, np.int32) if whole else Streamed(np.int32, nnz, segments(label_off, classes)),
        "confs": conf_arr,
        "verdict": np.zeros(n, np.uint8), "width": np.zeros(n, np.uint16), "height": np.zeros(n, np.uint16),
    }


def _positions(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The value positions of CSR rows `rows` (vectorised)."""
    starts, ends = offsets[rows].astype(np.int64), offsets[rows + 1].astype(np.int64)
    lens = ends - starts
    out_off = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lens, out=out_off[1:])
    return np.repeat(starts - out_off[:-1], lens) + np.arange(out_off[-1])


# ----------------------------------------------------------------------------- building from shards


def _sample_ids(idx_path: Path, samples: list) -> list[int]:
    """The sample ids of a DALI index written by to-shards: the key of each sample's first member."""
    ids = []
    for n, members in enumerate(samples, start=2):
        key = sample_key(members)
        if not key.isdigit():
            raise DataError(f"{idx_path}:{n}: sample key '{key}' is not a sample id: these shards were not "
                            "written by `hvpmtl data to-shards`")
        ids.append(int(key))
    return ids


def shard_sources(folder: Path, manifest: dict, content_hash: bool = True) -> dict:
    """The files a shard index depends on, with their keys (manifest hashed; the tars by size and mtime)."""
    key = {"manifest": file_key(folder / MANIFEST, content_hash), "files": {}}
    base = str(folder)
    tars = [s["name"] for s in manifest["shards"]]
    for name in [LABELS] + tars + [os.path.splitext(t)[0] + ".idx" for t in tars]:  # plain strings: 35k at 17.6M
        try:
            st = os.stat(os.path.join(base, name))
            key["files"][name] = [st.st_size, st.st_mtime_ns]
        except OSError:
            key["files"][name] = None
    return key


def build_shard_index(folder: str | os.PathLike, out: str | os.PathLike | None = None, *,
                      verdicts: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
                      verdict_meta: Optional[dict] = None, extra_issues: Iterable[Issue] = (),
                      wait_s: float = 600.0, log: Callable[[str], None] = print) -> Path:
    """Index a shard folder from its manifest, labels.npz and DALI index files (no tar content is
    read), under the index's build lock. Sample i of the index is stored id i; `shard`/`shard_pos`
    say where it lies (-1: in no tar). `verdicts` (verdict, width, height by id) replace the checks
    to-shards recorded."""
    out = Path(out) if out else default_index_path(folder)
    with build_lock(out, wait_s, log):
        return write_shard_index(folder, out, verdicts=verdicts, verdict_meta=verdict_meta,
                                 extra_issues=extra_issues)


def write_shard_index(folder: str | os.PathLike, out: Path, *, verdicts=None, verdict_meta=None,
                      extra_issues: Iterable[Issue] = ()) -> Path:
    """build_shard_index without the lock (its holder calls this)."""
    folder = Path(folder)
    ss = load_shard_set(folder)
    key = shard_sources(folder, ss.manifest)
    rec = ss.record()
    n = len(rec["lines"])
    shard_of = np.full(n, -1, np.int32)
    shard_pos = np.zeros(n, np.int32)
    issues: list[Issue] = [_detail(i) for i in extra_issues]
    for s, tar in enumerate(ss.tars):
        idx = tar.with_suffix(".idx")
        if not tar.exists():
            raise DataError(f"{tar}: listed in {folder}/manifest.json but missing; restore it or rewrite the shards")
        if not idx.exists():
            raise DataError(f"{idx}: no DALI index beside {tar.name}; write it with `hvpmtl data index-shards {folder}`")
        samples = read_index(idx)
        if samples_end(samples) > tar.stat().st_size:  # cheap staleness check: the index points past the tar
            raise DataError(f"{idx}: the index points past the end of {tar.name} (stale); rewrite it with "
                            f"`hvpmtl data index-shards {folder}`")
        ids = _sample_ids(idx, samples)
        if not ids:
            issues.append(Issue("empty-shard", tar.name, 0, "0 samples"))
            continue
        a = np.asarray(ids, np.int64)
        if a.min() < 0 or a.max() >= n:
            raise DataError(f"{idx}: sample ids outside the label table [0, {n}); rewrite the shards")
        twice = a[shard_of[a] >= 0]
        if len(twice) or len(np.unique(a)) < len(a):
            raise DataError(f"{idx}: sample id {int(twice[0]) if len(twice) else int(a[0])} is in more than one place; "
                            "rewrite the shards")
        shard_of[a] = s
        shard_pos[a] = np.arange(1, len(a) + 1, dtype=np.int32)
    if verdicts is None:
        files = rec.files
        verdicts = tuple(rec[k] if k in files else np.zeros(n, dt)
                         for k, dt in (("verdict", np.uint8), ("width", np.uint16), ("height", np.uint16)))
        verdict_meta = {"by": "to-shards", "full_decode": False} if "verdict" in files else None
    header = {"kind": "shards", "source": str(folder.resolve()), "key": key,
              "num_classes": ss.manifest.get("num_classes"), "num_lines": n, "issue_files": [str(folder)] +
              [t.name for t in ss.tars], "verdicts": verdict_meta}
    counts = np.diff(rec["indptr"]).astype(np.int64)
    arrays = _sample_arrays(header, np.asarray(rec["path_blob"], np.uint8), np.asarray(rec["path_offsets"], np.int64),
                            np.asarray(rec["lines"], np.int64), counts, np.asarray(rec["classes"], np.int32),
                            np.asarray(rec["confs"], np.float32), np.ones(n, bool))
    arrays["verdict"], arrays["width"], arrays["height"] = (np.asarray(v, dt) for v, dt in
                                                          zip(verdicts, (np.uint8, np.uint16, np.uint16)))
    arrays["shard"], arrays["shard_pos"] = shard_of, shard_pos
    for i in issues:
        if i.file not in header["issue_files"]:
            header["issue_files"].append(i.file)
    header["issue_counts"] = _count_codes(issues)
    header["shards"] = [s["name"] for s in ss.manifest["shards"]]
    header["per_shard"] = np.bincount(shard_of[shard_of >= 0], minlength=len(ss.tars)).tolist()
    header["absent"] = int(np.count_nonzero(shard_of < 0))
    header.update(verdict_stats(arrays["verdict"], arrays["width"], arrays["height"], n))
    return write_index_file(out, header, arrays, _issue_rows(issues, header["issue_files"]))


# ----------------------------------------------------------------------------- verdicts


def verdict_stats(verdict: np.ndarray, width: np.ndarray, height: np.ndarray, n: int) -> dict:
    """What start-up needs to know without reading the verdict arrays: how many samples have an error,
    how many nobody checked, and the largest width x height seen (so that max_pixels needs no scan)."""
    errors = unchecked = biggest = 0
    for a in range(0, len(verdict), CHUNK_ROWS * 8):
        v = verdict[a:a + CHUNK_ROWS * 8]
        errors += int(np.count_nonzero(v >= FIRST_ERROR))
        unchecked += int(np.count_nonzero(v == UNCHECKED))
        if len(v):
            biggest = max(biggest, int((width[a:a + len(v)].astype(np.int64) * height[a:a + len(v)]).max()))
    return {"verdict_errors": errors, "unchecked": unchecked + (n - len(verdict)), "max_image_pixels": biggest}


def with_verdicts(index: DataIndex, verdict: np.ndarray, width: np.ndarray, height: np.ndarray, meta: dict) -> Path:
    """Rewrite the index (atomically, as a new file) with the validator's verdicts."""
    header = {k: v for k, v in index.header.items() if k != "format"}
    header["verdicts"] = meta
    header.update(verdict_stats(verdict, width, height, len(verdict)))
    arrays = dict(index.arrays)
    arrays["verdict"], arrays["width"], arrays["height"] = (np.asarray(verdict, np.uint8),
                                                          np.asarray(width, np.uint16), np.asarray(height, np.uint16))
    return write_index_file(index.path, header, arrays, index.issue_rows())


# ----------------------------------------------------------------------------- the build lock

LOCK_STALE_S = 60.0  # a build lock of another host whose mtime has not moved for this long (watched here) is dead
LEFTOVER_IDLE_S = 900.0  # build leftovers of another host (or of an older hvpmtl) untouched this long are removed


def index_lock(path: Path, log) -> HeartbeatLock:
    """`<index>.lock`: who builds an index now (hvpmtl/locks.py's HeartbeatLock)."""
    return HeartbeatLock(path, log, stale_s=LOCK_STALE_S, name="hvpmtl-index-lock")


def _owner(name: str, prefix: str, random_suffix: bool) -> tuple[str, int]:
    """(host, pid) of a leftover named `<prefix><host>-<pid>[-<random>]`; ('', 0) when it names none."""
    parts = name[len(prefix):].rsplit("-", 2 if random_suffix else 1)
    if len(parts) == (3 if random_suffix else 2) and parts[1].isdigit():
        return parts[0], int(parts[1])
    return "", 0


def _idle_s(p: Path) -> float:
    """Seconds since anything in `p` (a file, or a folder and its files) was written."""
    try:
        newest = p.stat().st_mtime
        if p.is_dir():
            for q in p.iterdir():
                newest = max(newest, q.stat().st_mtime)
    except OSError:
        return 0.0
    return time.time() - newest


def clean_leftovers(index_path: Path, log: Callable[[str], None] = print) -> int:
    """Remove what killed builds of `index_path` left beside it: build folders and temporary index
    files of dead processes on this host, and those of other hosts (or of hvpmtl before 2026-12,
    `.hvpidx-build-*`) untouched for LEFTOVER_IDLE_S. Called by the builder, under the lock."""
    host, removed = socket.gethostname(), 0
    try:
        entries = list(index_path.parent.iterdir())
    except OSError:
        return 0
    for p in entries:
        name = p.name
        for prefix, rnd in ((f".{index_path.name}.build-", True), (f".{index_path.name}.tmp-", False),
                            (".hvpidx-build-", None)):
            if not name.startswith(prefix):
                continue
            h, pid = _owner(name, prefix, rnd) if rnd is not None else ("", 0)
            if h == host and pid == os.getpid():
                break
            dead = (h == host and pid and not process_alive(pid, None)) or _idle_s(p) > LEFTOVER_IDLE_S
            if dead:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed += 1
            break
    if removed:
        log(f"removed {removed} leftover(s) of killed index builds beside {index_path}")
    return removed
