"""The data index: one Arrow IPC file (Feather v2, uncompressed) per data set, built once, memory-mapped
read-only by every rank (the 8 ranks of a node share one copy in the page cache). pandas, polars, duckdb and
pyarrow open it as a table (docs/DATA.md shows how).

    <source>.hvpidx      (default: beside the list file, or beside the shard folder)
    one record batch, one row per sample, no nulls:
        path        string; large_string past 2 GiB of paths; binary / large_binary when a path is not UTF-8
        line        int32 (int64 when it does not fit): the 1-based line in the list file
        labels      list<struct<class: int32, conf: dictionary<uint8, float32>>>: class ids and confidences
                    (one byte per label: Tencent has 3 distinct values); conf is float32 when there are more than
                    256 distinct values; large_list past 2^31 labels
        verdict     dictionary<uint8, string> over VERDICTS: the validator's verdict (0 = not checked)
        width, height      uint16: the size from the JPEG header (0 = unknown)
        shard, shard_pos   int32, shard indexes only: the tar (-1: in no tar) and 1-based position of a sample id
    schema metadata (UTF-8 text):
        hvpmtl.index    FORMAT (the version)
        hvpmtl.header   JSON: kind (list | shards), source, its freshness key (size, mtime_ns, sha256; for shards
                        the manifest's and every tar's), counts, the validator's settings, shard names, issue counts
        hvpmtl.issues   JSON: the parse/shard issues, each [code, file number (header issue_files), line, detail, path]
        hvpmtl.sha256   the sha256 of the whole file read with this value's bytes as SHA_BLANK (the schema, so this
                        value, is stored twice: after the magic and in the footer)

Inside hvpmtl the arrays keep the names of the format before (hvpmtl-data-index-v1): path_offsets/path_blob,
lines, indptr/classes/confs (the label CSR), verdict, width, height, shard, shard_pos: numpy views of the mapping.
The verdict codes are defined here (VERDICTS and the names below), and only here. Writing the file: index_write.py;
reading it: index_file.py; building an index: index_build.py; whether one is fresh, and building it at start-up:
index_fresh.py.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import pyarrow as pa

MAGIC = b"ARROW1"  # an Arrow IPC file starts and ends with it
OLD_MAGIC = b"HVPIDX\x00\x01"  # hvpmtl-data-index-v1, the custom format before 2026-12
FORMAT = "hvpmtl-data-index-v2"
SUFFIX = ".hvpidx"
CHUNK_ROWS = 1 << 20  # rows per streamed chunk when writing
# verdict byte -> code; 0 = not checked, 1 = fine; the rest are the validator's issue codes
VERDICTS = ("unchecked", "ok", "grayscale", "cmyk", "missing-file", "unreadable", "zero-byte", "truncated",
            "corrupt-jpeg", "not-jpeg", "bad-shard", "duplicate-path", "oversized", "bad-path")
VERDICT = {c: i for i, c in enumerate(VERDICTS)}
UNCHECKED, OK = 0, 1
FIRST_ERROR = VERDICT["missing-file"]  # verdict bytes from here on are errors
USABLE = (VERDICT["ok"], VERDICT["grayscale"], VERDICT["cmyk"])

KEY_FORMAT, KEY_HEADER, KEY_ISSUES, KEY_SHA256 = "hvpmtl.index", "hvpmtl.header", "hvpmtl.issues", "hvpmtl.sha256"
SHA_BLANK = b"hvpmtl-sha256-to-be-written-here".ljust(64, b"-")  # what the writer hashes in the digest's place
REBUILD = "rebuild it with `hvpmtl data index` (never edit or overwrite an index in place)"


def default_index_path(source: str | os.PathLike) -> Path:
    return Path(str(source).rstrip("/") + SUFFIX)


# ----------------------------------------------------------------------------- the columns

CONF_CODES = pa.dictionary(pa.uint8(), pa.float32())
VERDICT_TYPE = pa.dictionary(pa.uint8(), pa.string())


def labels_type(large: bool, conf: pa.DataType) -> pa.DataType:
    item = pa.struct([("class", pa.int32()), ("conf", conf)])
    return pa.large_list(item) if large else pa.list_(item)


# Every column's name and the Arrow types it may have: a file naming anything else is refused before any of
# its arrays is used (the numpy views below assume these layouts).
COLUMN_TYPES = {
    "path": (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()),
    "line": (pa.int32(), pa.int64()),
    "labels": tuple(labels_type(large, conf) for large in (False, True) for conf in (CONF_CODES, pa.float32())),
    "verdict": (VERDICT_TYPE,),
    "width": (pa.uint16(),), "height": (pa.uint16(),),
    "shard": (pa.int32(),), "shard_pos": (pa.int32(),),
}
# the numpy dtype of each plain column type above (Arrow's to_pandas_dtype() would import pandas: 0.6 s at start-up)
NUMPY = {pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.int32(): np.int32, pa.int64(): np.int64}
LIST_COLUMNS = ("path", "line", "labels", "verdict", "width", "height")
SHARD_COLUMNS = LIST_COLUMNS + ("shard", "shard_pos")
PER_SAMPLE = {"lines": "line", "verdict": "verdict", "width": "width", "height": "height", "shard": "shard",
              "shard_pos": "shard_pos"}  # array name -> its column (one value per sample)


class Streamed:
    """An array written in chunks (so a big one never sits in memory twice): `chunks()` yields
    numpy arrays of `dtype` whose lengths add up to `length`."""

    def __init__(self, dtype, length: int, chunks: Callable[[], Iterable[np.ndarray]]):
        self.dtype, self.length, self.chunks = np.dtype(dtype), int(length), chunks


def temp_name(path: Path, kind: str) -> str:
    """A temporary name beside `path` that says whose it is: `.<name>.<kind>-<host>-<pid>`."""
    return f".{path.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def is_int(v, lo: int = 0, hi: int = 2**62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


# ----------------------------------------------------------------------------- the checksum


def schema_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """Where the schema (and so the metadata) lies: the message after the 8-byte magic, and the footer."""
    head, tail = os.pread(fd, 16, 0), os.pread(fd, 10, max(0, size - 10))
    if len(head) < 16 or head[8:12] != b"\xff\xff\xff\xff" or len(tail) < 10:
        return []
    n, m = int.from_bytes(head[12:16], "little"), int.from_bytes(tail[:4], "little")
    if not (0 < n <= size - 16 and 0 < m <= size - 18):
        return []
    return [(16, 16 + n), (size - 10 - m, size - 10)]


def checksum_spots(fd: int, size: int, value: bytes) -> Optional[list[int]]:
    """The file offsets of `value` (the stored digest), once in the schema after the magic and once in the
    footer's; None when it is not found exactly so."""
    out = []
    for a, b in schema_regions(fd, size):
        raw = os.pread(fd, b - a, a)
        if raw.count(value) != 1:
            return None
        out.append(a + raw.index(value))
    return out if len(out) == 2 else None


def checksum_digest(f, size: int, spots: list[int], progress=None) -> str:
    """sha256 of the file's first `size` bytes, SHA_BLANK read at `spots` (read(), not a mapping: no SIGBUS
    when the file shrinks meanwhile)."""
    h = hashlib.sha256()
    f.seek(0)
    at = 0
    while at < size and (chunk := f.read(min(8 << 20, size - at))):
        for s in spots:
            if s < at + len(chunk) and s + len(SHA_BLANK) > at:
                chunk = bytearray(chunk) if isinstance(chunk, bytes) else chunk
                lo, hi = max(s, at), min(s + len(SHA_BLANK), at + len(chunk))
                chunk[lo - at:hi - at] = SHA_BLANK[lo - s:hi - s]
        h.update(chunk)
        at += len(chunk)
        if progress is not None:
            progress.add(len(chunk))
    return h.hexdigest()
