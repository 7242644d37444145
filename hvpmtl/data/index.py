"""The data index: one compact binary file per data set, built once, memory-mapped read-only by every
rank (the 8 ranks of a node share one copy in the page cache).

    <source>.hvpidx      (default: beside the list file, or beside the shard folder)
    bytes 0-7   magic b"HVPIDX\\0\\1";  8-15 header length H (little-endian u64)
    16..16+H    JSON header: format, kind (list | shards), the source's key (size, mtime_ns, sha256),
                counts, the confidence table, the validator's settings, and where each array starts
    then        the arrays, 64-byte aligned:
                path_offsets, path_blob     the image paths as one byte blob
                lines                       1-based line in the list file (int32 when it fits)
                indptr, classes, confs      CSR labels: class int32, confidence as one byte into
                                            `conf_table` (Tencent has 3 values) or float32
                verdict, width, height      the validator's verdict per sample (0 = not checked) and
                                            the size from the JPEG header (0 = unknown)
                shard, shard_pos            shards only: the tar and 1-based position of a sample id
                issue_*                     parse issues (file, line, code, detail, path)

A list index is keyed by the list file's size, mtime and sha256: size and mtime equal -> fresh; the
size equal but the mtime not (a copy without -p) -> the content hash decides. A shard index is keyed
by manifest.json's hash and the size and mtime of every tar, DALI index and labels.npz. A missing
or stale index is built by `hvpmtl data index` (offline, once per data set), by `to-shards` and
`validate`, or at training start-up for small data sets (data.index_auto_build samples at most),
by one process per file system under a lock file while the others wait (see ensure_index).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import pyarrow as pa

from hvpmtl.data.issues import CODES, DataError, Issue, make_issue
from hvpmtl.data.tars import INDEX_VERSION, LABELS, MANIFEST, load_shard_set, split_name
from hvpmtl.data.tencent import find_duplicates, iter_list_blocks

MAGIC = b"HVPIDX\x00\x01"
FORMAT = "hvpmtl-data-index-v1"
SUFFIX = ".hvpidx"
ALIGN = 64
CHUNK_ROWS = 1 << 20  # rows per streamed chunk when writing
# verdict byte -> code; 0 = not checked, 1 = fine; the rest are the validator's issue codes
VERDICTS = ("unchecked", "ok", "grayscale", "cmyk", "missing-file", "unreadable", "zero-byte", "truncated",
            "corrupt-jpeg", "not-jpeg", "bad-shard", "duplicate-path", "oversized")
VERDICT = {c: i for i, c in enumerate(VERDICTS)}
UNCHECKED, OK = 0, 1
USABLE = (VERDICT["ok"], VERDICT["grayscale"], VERDICT["cmyk"])
ISSUE_CODES = tuple(CODES)


def default_index_path(source: str | os.PathLike) -> Path:
    return Path(str(source).rstrip("/") + SUFFIX)


def file_key(path: str | os.PathLike, content_hash: bool = True) -> dict:
    st = os.stat(path)
    key = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if content_hash:
        key["sha256"] = sha256_file(path)
    return key


def sha256_file(path: str | os.PathLike, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the file format


class Streamed:
    """An array written in chunks (so a big one never sits in memory twice): `chunks()` yields
    numpy arrays of `dtype` whose lengths add up to `length`."""

    def __init__(self, dtype, length: int, chunks: Callable[[], Iterable[np.ndarray]]):
        self.dtype, self.length, self.chunks = np.dtype(dtype), int(length), chunks


def _as_streamed(a) -> Streamed:
    if isinstance(a, Streamed):
        return a
    a = np.ascontiguousarray(a)
    return Streamed(a.dtype, a.size, lambda: (a.reshape(-1)[i:i + CHUNK_ROWS * 8] for i in range(0, a.size,
                                                                                                 CHUNK_ROWS * 8)))


def write_index_file(path: str | os.PathLike, header: dict, arrays: dict) -> Path:
    """Write header + arrays to `path` atomically (a temporary file renamed over it, fsync'ed):
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    specs = {k: _as_streamed(v) for k, v in arrays.items()}
    layout, pos = {}, 0
    for k, s in specs.items():
        pos = -(-pos // ALIGN) * ALIGN
        layout[k] = [pos, s.dtype.str, s.length]
        pos += s.length * s.dtype.itemsize
    head = dict(header, format=FORMAT, arrays=layout)
    # the arrays start after the header, at a 4 KiB boundary: offsets in the JSON are relative to it
    text = json.dumps(head, separators=(",", ":")).encode()
    base = -(-(16 + len(text)) // 4096) * 4096
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(text).to_bytes(8, "little") + text)
            for k, s in specs.items():
                f.seek(base + layout[k][0])
                n = 0
                for c in s.chunks():
                    c = np.ascontiguousarray(c, s.dtype)
                    f.write(memoryview(c).cast("B"))
                    n += c.size
                if n != s.length:
                    raise RuntimeError(f"index array {k}: wrote {n} of {s.length} values")
            f.truncate(base + pos)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a crash once the folder is synced
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass
    return path


class DataIndex:
    """A mapped index. Arrays are read-only numpy views of the mapping; nothing is copied."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise DataError(f"{self.path}: no data index") from None
        except OSError as e:
            raise DataError(f"{self.path}: cannot read the data index: {e.strerror}") from None
        with f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise DataError(f"{self.path}: not an hvpmtl data index (rebuild it with `hvpmtl data index`)")
            n = int.from_bytes(head[8:], "little")
            try:
                self.header = json.loads(f.read(n))
            except ValueError:
                raise DataError(f"{self.path}: damaged data index header (rebuild it with `hvpmtl data index`)") \
                    from None
            size = os.fstat(f.fileno()).st_size
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if self.header.get("format") != FORMAT:
            raise DataError(f"{self.path}: index format {self.header.get('format')}, expected {FORMAT}; rebuild it")
        base = -(-(16 + n) // 4096) * 4096
        self.arrays: dict[str, np.ndarray] = {}
        for k, (off, dt, length) in self.header["arrays"].items():
            if base + off + length * np.dtype(dt).itemsize > size:
                raise DataError(f"{self.path}: truncated data index (array {k}); rebuild it")
            self.arrays[k] = np.frombuffer(self._mm, dt, length, base + off) if length else np.zeros(0, dt)

    def __getattr__(self, name):
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def source(self) -> str:
        return self.header["source"]

    @property
    def num_samples(self) -> int:
        return int(self.header["num_samples"])

    def __len__(self) -> int:
        return self.num_samples

    def conf_values(self, pos: np.ndarray) -> np.ndarray:
        """float32 confidences at label positions `pos`."""
        table = self.header.get("conf_table")
        raw = self.confs[pos]
        return np.asarray(table, np.float32)[raw] if table is not None else raw.astype(np.float32)

    def issues(self, errors_only: bool = False, limit: Optional[int] = None) -> list[Issue]:
        """The stored parse/shard issues, in file order."""
        files = self.header.get("issue_files", [])
        out = []
        codes, lines, fid = self.issue_code, self.issue_line, self.issue_file
        do, db, po, pb = self.issue_detail_offsets, self.issue_detail_blob, self.issue_path_offsets, self.issue_path_blob
        for j in range(len(codes)):
            code = ISSUE_CODES[codes[j]]
            if errors_only and CODES[code][0] != "error":
                continue
            detail = bytes(db[do[j]:do[j + 1]]).decode(errors="backslashreplace")
            path = bytes(pb[po[j]:po[j + 1]]).decode(errors="backslashreplace")
            out.append(make_issue(code, files[fid[j]], int(lines[j]), detail, path))
            if limit is not None and len(out) >= limit:
                break
        return out

    def close(self) -> None:
        self.arrays = {}
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive: the mapping goes with them
                pass


def _issue_arrays(issues: list[Issue], files: list[str]) -> dict:
    fid = {f: i for i, f in enumerate(files)}
    code_ix = {c: i for i, c in enumerate(ISSUE_CODES)}
    details = [i.message.encode(errors="surrogateescape") for i in issues]
    paths = [i.path.encode(errors="surrogateescape") for i in issues]

    def blob(parts):
        off = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([len(p) for p in parts], out=off[1:])
        return off, np.frombuffer(b"".join(parts), np.uint8)
    do, db = blob(details)
    po, pb = blob(paths)
    return {"issue_code": np.asarray([code_ix[i.code] for i in issues], np.uint8),
            "issue_line": np.asarray([i.line for i in issues], np.int64),
            "issue_file": np.asarray([fid[i.file] for i in issues], np.int32),
            "issue_detail_offsets": do, "issue_detail_blob": db, "issue_path_offsets": po, "issue_path_blob": pb}


def _detail(issue: Issue) -> Issue:
    """Stored issues keep their detail only: make_issue adds the advice again when they are read."""
    advice = CODES[issue.code][1]
    msg = issue.message
    detail = msg[:-len(advice) - 2] if msg.endswith("; " + advice) else ("" if msg == advice else msg)
    return Issue(issue.code, issue.file, issue.line, detail, issue.path)


def _smallest_int(max_value: int):
    return np.int32 if max_value < 2**31 else np.int64


# ----------------------------------------------------------------------------- building from a list file


def build_list_index(list_file: str | os.PathLike, out: str | os.PathLike | None = None, *,
                     num_classes: Optional[int] = None, progress=None, threads: Optional[int] = None) -> Path:
    """Parse a list file (streaming, vectorised) into its index; returns the index path. Peak memory:
    a few parse blocks plus the duplicate-path check (pyarrow's hash table over the paths)."""
    src = Path(list_file)
    out = Path(out) if out else default_index_path(src)
    try:
        before = os.stat(src)
    except OSError as e:
        raise DataError(f"cannot read list file {src}: {e.strerror}") from None
    tmpdir = Path(tempfile.mkdtemp(prefix=".hvpidx-build-", dir=out.parent))
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
            issues += [_detail(i) for i in b.issues]
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
        keep = np.ones(rows, bool)
        dup, first = find_duplicates(mm["hashes"], lambda r: bytes(mm["paths"][path_off[r]:path_off[r + 1]]))
        for r, f in zip(dup.tolist(), first.tolist()):
            p = bytes(mm["paths"][path_off[r]:path_off[r + 1]]).decode(errors="backslashreplace")
            issues.append(Issue("duplicate-path", str(src), int(mm["lines"][r]), f"already on line {int(mm['lines'][f])}",
                                p))
        keep[dup] = False
        if n_lines == 0 or (not keep.any() and not any(CODES[i.code][0] == "error" for i in issues)):
            issues.append(Issue("empty-list", str(src), 0, "0 samples"))
        issues.sort(key=lambda i: i.line)
        header = {"kind": "list", "source": str(src.resolve()),
                  "key": {"path": str(src.resolve()), "size": before.st_size, "mtime_ns": before.st_mtime_ns,
                          "sha256": h.hexdigest()},
                  "num_classes": num_classes, "num_lines": n_lines}
        codes = (mm["codes"], list(table)) if len(table) <= 256 and len(mm["codes"]) == len(mm["confs"]) else None
        arrays = _sample_arrays(header, mm["paths"], path_off, mm["lines"], mm["counts"], mm["classes"],
                                mm["confs"], keep, codes)
        arrays.update(_issue_arrays(issues, [str(src)]))
        header["issue_files"] = [str(src)]
        header["issue_counts"] = _count_codes(issues)
        return write_index_file(out, header, arrays)
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
    header.update(num_samples=n, nnz=nnz, conf_table=table, max_class=max_class,
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
    return {
        "path_offsets": Streamed(off_dt, n + 1, cumulative(lambda r: path_off[r + 1] - path_off[r], off_dt)),
        "path_blob": Streamed(np.uint8, blob_len, segments(path_off, blob)),
        "lines": Streamed(line_dt, n, lambda: (lines[r].astype(line_dt) for r in rows_chunks())),
        "indptr": Streamed(ptr_dt, n + 1, cumulative(lambda r: counts[r], ptr_dt)),
        "classes": Streamed(np.int32, nnz, segments(label_off, classes)),
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


def _idx_ids(idx_path: Path) -> list[int]:
    """The sample ids of a DALI index written by to-shards: the key of each sample's first member."""
    text = idx_path.read_text().splitlines()
    head = text[0].split() if text else []
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise DataError(f"{idx_path}:1: not a DALI {INDEX_VERSION} webdataset index; rewrite it with "
                        f"`hvpmtl data index-shards {idx_path.parent}`")
    ids = []
    for n, line in enumerate(text[1:], start=2):
        t = line.split(" ", 4)
        if len(t) < 4:
            raise DataError(f"{idx_path}:{n}: expected groups of 'ext offset size name'")
        key = split_name(t[3])[0]
        if not key.isdigit():
            raise DataError(f"{idx_path}:{n}: sample key '{key}' is not a sample id: these shards were not "
                            "written by `hvpmtl data to-shards`")
        ids.append(int(key))
    if len(ids) != int(head[1]):
        raise DataError(f"{idx_path}:1: header says {head[1]} samples, the file lists {len(ids)}")
    return ids


def _idx_end(idx_path: Path) -> int:
    end = 0
    for line in idx_path.read_text().splitlines()[1:]:
        t = line.split()
        for i in range(0, len(t) - 3, 4):
            end = max(end, int(t[i + 1]) + int(t[i + 2]))
    return end


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
                      verdict_meta: Optional[dict] = None, extra_issues: Iterable[Issue] = ()) -> Path:
    """Index a shard folder from its manifest, labels.npz and DALI index files (no tar content is
    read). Sample i of the index is stored id i; `shard`/`shard_pos` say where it lies (-1: in no tar).
    `verdicts` (verdict, width, height by id) replace the checks to-shards recorded."""
    folder = Path(folder)
    out = Path(out) if out else default_index_path(folder)
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
        if _idx_end(idx) > tar.stat().st_size:  # cheap staleness check: the index points past the tar
            raise DataError(f"{idx}: the index points past the end of {tar.name} (stale); rewrite it with "
                            f"`hvpmtl data index-shards {folder}`")
        ids = _idx_ids(idx)
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
    arrays.update(_issue_arrays(issues, header["issue_files"]))
    header["issue_counts"] = _count_codes(issues)
    header["shards"] = [s["name"] for s in ss.manifest["shards"]]
    header["per_shard"] = np.bincount(shard_of[shard_of >= 0], minlength=len(ss.tars)).tolist()
    header["absent"] = int(np.count_nonzero(shard_of < 0))
    header.update(verdict_stats(arrays["verdict"], arrays["width"], arrays["height"], n))
    return write_index_file(out, header, arrays)


# ----------------------------------------------------------------------------- verdicts


def verdict_stats(verdict: np.ndarray, width: np.ndarray, height: np.ndarray, n: int) -> dict:
    """What start-up needs to know without reading the verdict arrays: how many samples have an error,
    how many nobody checked, and the largest width x height seen (so that max_pixels needs no scan)."""
    errors = unchecked = biggest = 0
    for a in range(0, len(verdict), CHUNK_ROWS * 8):
        v = verdict[a:a + CHUNK_ROWS * 8]
        errors += int(np.count_nonzero(v >= VERDICT["missing-file"]))
        unchecked += int(np.count_nonzero(v == UNCHECKED))
        if len(v):
            biggest = max(biggest, int((width[a:a + len(v)].astype(np.int64) * height[a:a + len(v)]).max()))
    return {"verdict_errors": errors, "unchecked": unchecked + (n - len(verdict)), "max_image_pixels": biggest}


def with_verdicts(index: DataIndex, verdict: np.ndarray, width: np.ndarray, height: np.ndarray, meta: dict) -> Path:
    """Rewrite the index (atomically, as a new file) with the validator's verdicts."""
    header = {k: v for k, v in index.header.items() if k not in ("format", "arrays")}
    header["verdicts"] = meta
    header.update(verdict_stats(verdict, width, height, len(verdict)))
    arrays = dict(index.arrays)
    arrays["verdict"], arrays["width"], arrays["height"] = (np.asarray(verdict, np.uint8),
                                                          np.asarray(width, np.uint16), np.asarray(height, np.uint16))
    return write_index_file(index.path, header, arrays)


# ----------------------------------------------------------------------------- fresh or stale


def staleness(index: DataIndex, source: str | os.PathLike, num_classes: Optional[int]) -> str:
    """'' when `index` is the index of `source` as it is now (and fits num_classes), else why not."""
    h = index.header
    if num_classes is not None and h.get("num_classes") not in (None, num_classes):
        return f"it was built for {h['num_classes']} classes, data.num_classes is {num_classes}"
    if num_classes is not None and h.get("num_classes") is None and h.get("max_class", -1) >= num_classes:
        return f"it holds class index {h['max_class']} >= data.num_classes {num_classes}"
    source = Path(source)
    if h["kind"] == "list":
        key = h["key"]
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


def index_command(kind: str, source: str | os.PathLike, num_classes: Optional[int], out: Optional[str] = None) -> str:
    what = f"--list {source}" if kind == "list" else f"--shards {source}"
    cls = f" --num-classes {num_classes}" if num_classes is not None else ""
    o = f" --out {out}" if out else ""
    return f"hvpmtl data index {what}{cls}{o}"


def open_fresh(index_path: Path, kind: str, source, num_classes) -> tuple[Optional[DataIndex], str]:
    try:
        idx = DataIndex(index_path)
    except DataError as e:
        return None, str(e)
    if idx.kind != kind:
        return None, f"{index_path} indexes {idx.kind}, not {kind}"
    why = staleness(idx, source, num_classes)
    return (idx, "") if not why else (None, f"{index_path} is stale: {why}")


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
                 builder: bool = True, log: Callable[[str], None] = print) -> DataIndex:
    """The fresh index of a list file (kind 'list') or shard folder ('shards').

    Missing or stale: a DataError naming the command to run, unless the source has at most
    `auto_build_max` samples; then one process builds it, under `<index>.lock` (created with
    O_CREAT|O_EXCL, atomic on local file systems and NFSv3+), and the others poll for the renamed
    file. Only processes with `builder` (one per node: local rank 0) try the lock, so one process
    per file system builds: node-local or shared alike. A failed build leaves `<index>.failed`
    with its message, which the waiting processes raise; a lock older than `wait_s` is named in the
    error (its holder's host and pid are in it) and left for a person to remove.
    """
    source = Path(source)
    path = Path(index_path) if index_path else default_index_path(source)
    idx, why = open_fresh(path, kind, source, num_classes)
    if idx is not None:
        return idx
    cmd = index_command(kind, source, num_classes, str(path) if index_path else None)
    if auto_build_max <= 0 or count_samples(kind, source, auto_build_max) > auto_build_max:
        raise DataError(f"{why}.\nBuild the data index once with `{cmd}` (data sets of more than "
                        f"data.index_auto_build={auto_build_max} samples are not indexed at start-up).")
    lock, failed = path.with_name(path.name + ".lock"), path.with_name(path.name + ".failed")
    start = time.time()
    while True:
        if builder:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                fd = None
            except OSError as e:
                raise DataError(f"cannot create {lock} to build the data index: {e.strerror}; build it with "
                                f"`{cmd}` or set data.index to a writable place") from None
            if fd is not None:
                os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.ctime()}\n".encode())
                os.close(fd)
                try:
                    idx, why = open_fresh(path, kind, source, num_classes)  # another node may just have built it
                    if idx is None:
                        failed.unlink(missing_ok=True)
                        log(f"building the data index {path} ({why})")
                        t = time.perf_counter()
                        try:
                            if kind == "list":
                                build_list_index(source, path, num_classes=num_classes)
                            else:
                                build_shard_index(source, path)
                        except DataError as e:
                            failed.write_text(str(e))
                            raise
                        log(f"data index {path} built in {time.perf_counter() - t:.1f} s")
                        idx, why = open_fresh(path, kind, source, num_classes)
                        if idx is None:
                            raise DataError(f"the data index {path} was built but is not usable: {why}")
                    return idx
                finally:
                    lock.unlink(missing_ok=True)
        idx, _ = open_fresh(path, kind, source, num_classes)
        if idx is not None:
            return idx
        try:
            if failed.stat().st_mtime >= start - 1:
                raise DataError(failed.read_text())
        except FileNotFoundError:
            pass
        now = time.time()
        try:
            st = lock.stat()
            holder = lock.read_text().strip()
            if now - st.st_mtime > wait_s:
                raise DataError(f"{lock} (held by {holder}) is older than {wait_s:.0f} s: if no build is running, "
                                f"remove it, or build the index with `{cmd}`")
        except FileNotFoundError:
            holder = "nobody yet"
        if now - start > wait_s:
            raise DataError(f"waited {wait_s:.0f} s for the data index {path} (lock: {holder}); build it with `{cmd}`")
        time.sleep(0.2)
