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
import contextlib
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
from hvpmtl.data.tencent import find_duplicates, iter_list_blocks, norm_path
from hvpmtl.fileio import atomic_file, sha256_file
from hvpmtl.locks import HeartbeatLock, process_alive

MAGIC = b"HVPIDX\x00\x01"
FORMAT = "hvpmtl-data-index-v1"
SUFFIX = ".hvpidx"
ALIGN = 64
CHUNK_ROWS = 1 << 20  # rows per streamed chunk when writing
# verdict byte -> code; 0 = not checked, 1 = fine; the rest are the validator's issue codes
VERDICTS = ("unchecked", "ok", "grayscale", "cmyk", "missing-file", "unreadable", "zero-byte", "truncated",
            "corrupt-jpeg", "not-jpeg", "bad-shard", "duplicate-path", "oversized", "bad-path")
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


# ----------------------------------------------------------------------------- the file format

# Every array's name and the dtypes it may have: a header naming anything else is refused before mapping
# (numpy would otherwise build whatever dtype a damaged header names, objects included).
ARRAY_DTYPES = {
    "path_offsets": ("<i4", "<i8"), "path_blob": ("|u1",), "lines": ("<i4", "<i8"), "indptr": ("<i4", "<i8"),
    "classes": ("<i4",), "confs": ("|u1", "<f4"), "verdict": ("|u1",), "width": ("<u2",), "height": ("<u2",),
    "shard": ("<i4",), "shard_pos": ("<i4",), "issue_code": ("|u1",), "issue_line": ("<i8",),
    "issue_file": ("<i4",), "issue_detail_offsets": ("<i8",), "issue_detail_blob": ("|u1",),
    "issue_path_offsets": ("<i8",), "issue_path_blob": ("|u1",),
}
PER_SAMPLE = ("lines", "verdict", "width", "height")  # one value per sample
MAX_HEADER = 256 << 20  # bytes of JSON header; 17.6k shard names take ~1 MB
TRAILER_MAGIC = b"HVPSUM\x00\x01"  # then the sha256 of every byte before the trailer
TRAILER = len(TRAILER_MAGIC) + 32
REBUILD = "rebuild it with `hvpmtl data index` (never edit or overwrite an index in place)"


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


def _header_text(head: dict, data_len: int) -> tuple[bytes, int]:
    """(the JSON header, where the arrays start): the header records the file's final size, which
    depends on the header's own length, so lay it out until both agree."""
    base = 4096
    for _ in range(8):
        text = json.dumps(dict(head, file_size=base + data_len + TRAILER, checksum="sha256"),
                          separators=(",", ":")).encode()
        need = -(-(16 + len(text)) // 4096) * 4096
        if need == base:
            return text, base
        base = need
    raise RuntimeError("index header layout does not settle")  # cannot happen: base only grows


def _temp_name(path: Path, kind: str) -> str:
    """A temporary name beside `path` that says whose it is: `.<name>.<kind>-<host>-<pid>`."""
    return f".{path.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def write_index_file(path: str | os.PathLike, header: dict, arrays: dict) -> Path:
    """Write header + arrays + a sha256 trailer to a new file renamed over `path` (fsync'ed): readers
    see the old file or the new one, never half of one, and a job that maps the old one keeps it."""
    path = Path(path)
    specs = {k: _as_streamed(v) for k, v in arrays.items()}
    layout, pos = {}, 0
    for k, s in specs.items():
        pos = -(-pos // ALIGN) * ALIGN
        layout[k] = [pos, s.dtype.str, s.length]
        pos += s.length * s.dtype.itemsize
    # the arrays start after the header, at a 4 KiB boundary: offsets in the JSON are relative to it
    text, base = _header_text(dict(header, format=FORMAT, arrays=layout), pos)
    h = hashlib.sha256()
    with atomic_file(path, _temp_name(path, "tmp"), mode=0o644) as f:
        def put(b) -> None:
            h.update(b)
            f.write(b)
        put(MAGIC + len(text).to_bytes(8, "little") + text)
        at = 16 + len(text)
        for k, s in specs.items():
            put(bytes(base + layout[k][0] - at))  # zero padding: hashed like the rest
            n = 0
            for c in s.chunks():
                c = np.ascontiguousarray(c, s.dtype)
                put(memoryview(c).cast("B"))
                n += c.size
            if n != s.length:
                raise RuntimeError(f"index array {k}: wrote {n} of {s.length} values")
            at = base + layout[k][0] + n * s.dtype.itemsize
        put(bytes(base + pos - at))
        f.write(TRAILER_MAGIC + h.digest())
    return path


def _is_int(v, lo: int = 0, hi: int = 2**62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


class DataIndex:
    """A mapped index. Arrays are read-only numpy views of the mapping; nothing is copied.

    Nothing in the file is trusted before it is checked: the header's length, every array's name,
    dtype (a closed list) and extent against the file's size, the lengths against the sample count,
    the end points of the CSR offsets; all before the arrays are mapped (O(1): no array is scanned).
    The file stays open: `check_unchanged()` (one fstat, called before each batch's rows are read)
    turns an index truncated or rewritten in place under a running job into a DataError instead of
    a SIGBUS. `verify()` checks the whole-file checksum and every array's invariants (offline)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mm = None
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise DataError(f"{self.path}: no data index") from None
        except OSError as e:
            raise DataError(f"{self.path}: cannot read the data index: {e.strerror}") from None
        try:
            self._open(f)
        except BaseException:
            f.close()
            raise
        self._file = f

    def _damaged(self, what: str) -> DataError:
        return DataError(f"{self.path}: damaged data index: {what}; {REBUILD}")

    def _open(self, f) -> None:
        st = os.fstat(f.fileno())
        size = st.st_size
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise DataError(f"{self.path}: not an hvpmtl data index (rebuild it with `hvpmtl data index`)")
        n = int.from_bytes(head[8:], "little")
        if n > min(size - 16, MAX_HEADER):
            raise self._damaged(f"header length {n} runs past the file's {size} bytes")
        try:
            self.header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise self._damaged("the header is not JSON") from None
        h = self.header
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            fmt = h.get("format") if isinstance(h, dict) else None
            raise DataError(f"{self.path}: index format {str(fmt)[:80]}, expected {FORMAT}; rebuild it")
        self.has_checksum = h.get("checksum") == "sha256"
        if "file_size" in h and h["file_size"] != size:
            raise DataError(f"{self.path}: truncated or changed data index ({size} bytes, written as "
                            f"{h['file_size']}); {REBUILD}")
        if not _is_int(h.get("num_samples")) or h.get("kind") not in ("list", "shards") or \
                not isinstance(h.get("arrays"), dict):
            raise self._damaged("header fields kind, num_samples or arrays are missing or of the wrong type")
        base = -(-(16 + n) // 4096) * 4096
        end = size - (TRAILER if self.has_checksum else 0)
        layout = {}
        for k, spec in h["arrays"].items():
            if k not in ARRAY_DTYPES:
                raise self._damaged(f"unknown array '{str(k)[:40]}'")
            if not (isinstance(spec, list) and len(spec) == 3 and _is_int(spec[0]) and _is_int(spec[2])
                    and spec[1] in ARRAY_DTYPES[k]):
                raise self._damaged(f"array {k}: layout {str(spec)[:80]} (dtypes allowed: "
                                    f"{', '.join(ARRAY_DTYPES[k])})")
            off, dt, length = spec
            if base + off + length * np.dtype(dt).itemsize > end:
                raise DataError(f"{self.path}: truncated data index (array {k} runs past the end); {REBUILD}")
            layout[k] = (off, dt, length)
        self._check_lengths(layout)
        self._at = {k: (base + off, np.dtype(dt), length) for k, (off, dt, length) in layout.items()}
        self._size, self._mtime = size, st.st_mtime_ns
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if self._mm is not None and len(self._mm) != size:  # changed between fstat and mmap
            raise DataError(f"{self.path}: the data index changed while it was opened; open it again")
        self.arrays: dict[str, np.ndarray] = {}
        for k, (off, dt, length) in layout.items():
            self.arrays[k] = np.frombuffer(self._mm, dt, length, base + off) if length else np.zeros(0, dt)
        self._check_ends()

    def _check_lengths(self, layout: dict) -> None:
        h = self.header
        n = h["num_samples"]
        need = dict.fromkeys(("path_offsets", "indptr"), n + 1)
        need.update(dict.fromkeys(PER_SAMPLE, n))
        need.update(classes=None, confs=None, path_blob=None)
        if h["kind"] == "shards":
            need.update(shard=n, shard_pos=n)
        for k, want in need.items():
            if k not in layout:
                raise self._damaged(f"array {k} is missing")
            if want is not None and layout[k][2] != want:
                raise self._damaged(f"array {k} holds {layout[k][2]} values, {want} expected for {n} samples")
        nnz = h.get("nnz")
        if not _is_int(nnz) or layout["classes"][2] != nnz or layout["confs"][2] != nnz:
            raise self._damaged(f"{layout['classes'][2]} classes and {layout['confs'][2]} confidences for nnz {nnz}")
        table = h.get("conf_table")
        if layout["confs"][1] == "|u1":
            if not (isinstance(table, list) and len(table) <= 256 and (table or nnz == 0) and
                    all(isinstance(v, (int, float)) and 0 < v <= 1 for v in table)):
                raise self._damaged("the confidence table is missing or holds values outside (0, 1]")
        if not _is_int(h.get("max_class", -1), -1, 2**31 - 1):
            raise self._damaged(f"max_class {str(h.get('max_class'))[:40]}")
        if not _is_int(h.get("max_labels", 0), 0, 2**31):
            raise self._damaged(f"max_labels {str(h.get('max_labels'))[:40]}")
        issues = [k for k in layout if k.startswith("issue_")]
        if issues:
            m = layout["issue_code"][2] if "issue_code" in layout else -1
            for k in ("issue_code", "issue_line", "issue_file"):
                if layout.get(k, (0, 0, -2))[2] != m:
                    raise self._damaged(f"issue arrays of different lengths ({k})")
            for k in ("issue_detail_offsets", "issue_path_offsets"):
                if layout.get(k, (0, 0, -2))[2] != m + 1:
                    raise self._damaged(f"issue arrays of different lengths ({k})")
            files = h.get("issue_files", [])
            if not isinstance(files, list) or not all(isinstance(x, str) for x in files):
                raise self._damaged("issue_files is not a list of names")

    def _check_ends(self) -> None:
        """The CSR end points (a few values): every row's slice must lie inside its values array."""
        a = self.arrays
        for ptr, values in (("indptr", "classes"), ("path_offsets", "path_blob"),
                            ("issue_detail_offsets", "issue_detail_blob"), ("issue_path_offsets", "issue_path_blob")):
            if ptr in a and (int(a[ptr][0]) != 0 or int(a[ptr][-1]) != len(a[values])):
                raise self._damaged(f"{ptr} runs from {int(a[ptr][0])} to {int(a[ptr][-1])}, not 0 to {len(a[values])}")

    def check_unchanged(self) -> None:
        """DataError when the file under the mapping was truncated or rewritten in place (one fstat).
        A new file renamed over the path is fine: this mapping keeps the old one."""
        f = self.__dict__.get("_file")
        if f is None or f.closed:
            return
        st = os.fstat(f.fileno())
        if st.st_size != self._size or st.st_mtime_ns != self._mtime:
            what = "truncated" if st.st_size < self._size else "rewritten"
            raise DataError(f"{self.path} was {what} in place while this job was reading it ({self._size} -> "
                            f"{st.st_size} bytes): the job stops before it reads damaged labels. A data index must "
                            "never be overwritten in place: build a new one (`hvpmtl data index` writes a new file "
                            "and renames it), then restart the job")

    def take(self, name: str, pos) -> np.ndarray:
        """array `name` at positions `pos`, read with pread rather than through the mapping: a batch's
        rows read while the file is truncated or rewritten in place give a short read or a changed
        fstat (a DataError), never a SIGBUS. One pread per run of consecutive positions (a label row
        is one run); the fstat after the reads catches bytes that changed while they were read."""
        start, dt, length = self._at[name]
        pos = np.asarray(pos, np.int64).ravel()
        if not len(pos):
            return np.zeros(0, dt)
        if int(pos.min()) < 0 or int(pos.max()) >= length:
            raise self._damaged(f"a read of {name} at {int(pos.min())}..{int(pos.max())} runs past its {length} values")
        cut = np.flatnonzero(np.diff(pos) != 1) + 1
        firsts, lens = pos[np.r_[0, cut]], np.diff(np.r_[0, cut, len(pos)])
        fd, size = self._file.fileno(), dt.itemsize
        parts = []
        for a, n in zip(firsts.tolist(), lens.tolist()):
            b = os.pread(fd, n * size, start + a * size)
            if len(b) != n * size:
                self.check_unchanged()
                raise DataError(f"{self.path}: short read of {name} (the file changed under this job); {REBUILD}")
            parts.append(b)
        self.check_unchanged()
        return np.frombuffer(b"".join(parts), dt)

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
        return self.decode_confs(self.confs[pos])

    def decode_confs(self, raw: np.ndarray) -> np.ndarray:
        """float32 confidences of stored values `raw` (codes into the table, or floats)."""
        table = self.header.get("conf_table")
        return np.asarray(table, np.float32)[raw] if table is not None else raw.astype(np.float32)

    def issues(self, errors_only: bool = False, limit: Optional[int] = None) -> list[Issue]:
        """The stored parse/shard issues, in file order."""
        files = self.header.get("issue_files", [])
        out = []
        codes, lines, fid = self.issue_code, self.issue_line, self.issue_file
        do, db, po, pb = self.issue_detail_offsets, self.issue_detail_blob, self.issue_path_offsets, self.issue_path_blob
        for j in range(len(codes)):
            if codes[j] >= len(ISSUE_CODES) or not 0 <= fid[j] < len(files) or not do[j] <= do[j + 1] <= len(db) \
                    or not po[j] <= po[j + 1] <= len(pb):
                raise self._damaged(f"stored issue {j} is out of range")
            code = ISSUE_CODES[codes[j]]
            if errors_only and CODES[code][0] != "error":
                continue
            detail = bytes(db[do[j]:do[j + 1]]).decode(errors="backslashreplace")
            path = bytes(pb[po[j]:po[j + 1]]).decode(errors="backslashreplace")
            out.append(make_issue(code, files[fid[j]], int(lines[j]), detail, path))
            if limit is not None and len(out) >= limit:
                break
        return out

    def verify(self, progress=None) -> list[str]:
        """Every problem a full read finds (offline: `hvpmtl data index --verify`, the validator): the
        whole-file checksum, then each array's invariants in chunks (offsets rising, classes and
        confidence codes in range, per-sample sizes), which also covers indexes without a checksum."""
        problems = []
        if self.has_checksum:
            h = hashlib.sha256()
            want = bytes(self._mm[self._size - 32:])
            with open(self.path, "rb") as f:  # read(), not the mapping: no SIGBUS if it shrinks meanwhile
                left = self._size - TRAILER
                while left > 0 and (chunk := f.read(min(8 << 20, left))):
                    h.update(chunk)
                    left -= len(chunk)
                    if progress is not None:
                        progress.add(len(chunk))
            if bytes(self._mm[self._size - TRAILER:self._size - 32]) != TRAILER_MAGIC or h.digest() != want:
                problems.append("the sha256 checksum does not match the content")
        a, hd = self.arrays, self.header
        top = hd.get("max_class", -1)
        rows = hd.get("max_labels")
        for s in range(0, len(self) + 1, CHUNK_ROWS * 8):
            for ptr in ("indptr", "path_offsets"):
                d = np.diff(a[ptr][s:s + CHUNK_ROWS * 8 + 1].astype(np.int64))
                if len(d) and d.min() < 0:
                    problems.append(f"{ptr} falls at sample {s + int(np.argmax(d < 0))}")
                if ptr == "indptr" and rows is not None and len(d) and d.max() > rows:
                    problems.append(f"sample {s + int(np.argmax(d > rows))} has more than max_labels {rows} labels")
        table = hd.get("conf_table")
        for s in range(0, len(a["classes"]), CHUNK_ROWS * 8):
            c = a["classes"][s:s + CHUNK_ROWS * 8]
            if len(c) and (int(c.min()) < 0 or int(c.max()) > top):
                problems.append(f"class ids outside [0, {top}] at label {s + int(np.argmax((c < 0) | (c > top)))}")
            f = a["confs"][s:s + CHUNK_ROWS * 8]
            bad = (f >= len(table)) if a["confs"].dtype == np.uint8 else ~((f > 0) & (f <= 1))
            if bad.any():
                problems.append(f"confidences out of range at label {s + int(np.argmax(bad))}")
        if "shard" in a:
            n_sh = len(hd.get("shards", []))
            for s in range(0, len(self), CHUNK_ROWS * 8):
                x = a["shard"][s:s + CHUNK_ROWS * 8]
                if len(x) and (int(x.min()) < -1 or int(x.max()) >= n_sh):
                    problems.append(f"shard numbers outside [-1, {n_sh}) at sample {s}")
        try:
            self.issues()
        except DataError as e:
            problems.append(str(e))
        v = a["verdict"]
        for s in range(0, len(v), CHUNK_ROWS * 8):
            if len(v[s:s + CHUNK_ROWS * 8]) and int(v[s:s + CHUNK_ROWS * 8].max()) >= len(VERDICTS):
                problems.append(f"verdict codes outside the table near sample {s}")
        return problems

    def close(self) -> None:
        self.arrays = {}
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive: the mapping goes with them
                pass
        f = self.__dict__.get("_file")
        if f is not None:
            f.close()


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


@contextlib.contextmanager
def build_lock(index_path: Path, wait_s: float = 600.0, log: Callable[[str], None] = print):
    """Hold the index's build lock (waiting up to wait_s for a live builder; a dead one's lock is taken
    over) and clear what killed builds left beside it."""
    lock = _build_lock(index_path.with_name(index_path.name + ".lock"), log)
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
        return _build_list_index(list_file, out, num_classes=num_classes, progress=progress, threads=threads)


def _build_list_index(list_file: str | os.PathLike, out: Path, *, num_classes: Optional[int] = None, progress=None,
                      threads: Optional[int] = None) -> Path:
    src = Path(list_file)
    try:
        before = os.stat(src)
    except OSError as e:
        raise DataError(f"cannot read list file {src}: {e.strerror}") from None
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=_temp_name(out, "build") + "-", dir=out.parent))
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
        dup, first = find_duplicates(mm["hashes"], lambda r: norm_path(bytes(mm["paths"][path_off[r]:path_off[r + 1]])))
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
                      verdict_meta: Optional[dict] = None, extra_issues: Iterable[Issue] = (),
                      wait_s: float = 600.0, log: Callable[[str], None] = print) -> Path:
    """Index a shard folder from its manifest, labels.npz and DALI index files (no tar content is
    read), under the index's build lock. Sample i of the index is stored id i; `shard`/`shard_pos`
    say where it lies (-1: in no tar). `verdicts` (verdict, width, height by id) replace the checks
    to-shards recorded."""
    out = Path(out) if out else default_index_path(folder)
    with build_lock(out, wait_s, log):
        return _build_shard_index(folder, out, verdicts=verdicts, verdict_meta=verdict_meta,
                                  extra_issues=extra_issues)


def _build_shard_index(folder: str | os.PathLike, out: Path, *, verdicts=None, verdict_meta=None,
                       extra_issues: Iterable[Issue] = ()) -> Path:
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
    key = h.get("key")
    if not isinstance(key, dict) or not all(_is_int(key.get(k)) for k in ("size", "mtime_ns")) and \
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
    lock, failed = _build_lock(path.with_name(path.name + ".lock"), log), path.with_name(path.name + ".failed")
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
                                _build_list_index(source, path, num_classes=num_classes)
                            else:
                                _build_shard_index(source, path)
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


# ----------------------------------------------------------------------------- the build lock

LOCK_STALE_S = 60.0  # a build lock of another host whose mtime has not moved for this long (watched here) is dead
LEFTOVER_IDLE_S = 900.0  # build leftovers of another host (or of an older hvpmtl) untouched this long are removed


def _build_lock(path: Path, log) -> HeartbeatLock:
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
