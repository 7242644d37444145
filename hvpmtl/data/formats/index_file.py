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

The verdict codes are defined here (VERDICTS and the names below), and only here. Building an index:
index_build.py; whether one is fresh, and building it at start-up: index_fresh.py.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import socket
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from hvpmtl.data.formats.issues import CODES, DataError, Issue, make_issue
from hvpmtl.fileio import atomic_file

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
FIRST_ERROR = VERDICT["missing-file"]  # verdict bytes from here on are errors
USABLE = (VERDICT["ok"], VERDICT["grayscale"], VERDICT["cmyk"])
ISSUE_CODES = tuple(CODES)


def default_index_path(source: str | os.PathLike) -> Path:
    return Path(str(source).rstrip("/") + SUFFIX)


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


def temp_name(path: Path, kind: str) -> str:
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
    with atomic_file(path, temp_name(path, "tmp"), mode=0o644) as f:
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


def is_int(v, lo: int = 0, hi: int = 2**62) -> bool:
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
        if not is_int(h.get("num_samples")) or h.get("kind") not in ("list", "shards") or \
                not isinstance(h.get("arrays"), dict):
            raise self._damaged("header fields kind, num_samples or arrays are missing or of the wrong type")
        base = -(-(16 + n) // 4096) * 4096
        end = size - (TRAILER if self.has_checksum else 0)
        layout = {}
        for k, spec in h["arrays"].items():
            if k not in ARRAY_DTYPES:
                raise self._damaged(f"unknown array '{str(k)[:40]}'")
            if not (isinstance(spec, list) and len(spec) == 3 and is_int(spec[0]) and is_int(spec[2])
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
        if not is_int(nnz) or layout["classes"][2] != nnz or layout["confs"][2] != nnz:
            raise self._damaged(f"{layout['classes'][2]} classes and {layout['confs'][2]} confidences for nnz {nnz}")
        table = h.get("conf_table")
        if layout["confs"][1] == "|u1":
            if not (isinstance(table, list) and len(table) <= 256 and (table or nnz == 0) and
                    all(isinstance(v, (int, float)) and 0 < v <= 1 for v in table)):
                raise self._damaged("the confidence table is missing or holds values outside (0, 1]")
        if not is_int(h.get("max_class", -1), -1, 2**31 - 1):
            raise self._damaged(f"max_class {str(h.get('max_class'))[:40]}")
        if not is_int(h.get("max_labels", 0), 0, 2**31):
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
