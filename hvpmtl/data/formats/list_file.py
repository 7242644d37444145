"""List files in memory: the usable samples as CSR-packed labels (LabelList), read through the one list
parse (list_parse.py), and the writer. The format is described in list_parse.py."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from hvpmtl.data.formats.issues import Issue
from hvpmtl.data.formats.list_parse import csr_take, iter_list_blocks, list_issues, no_label_issues


@dataclass
class LabelList:
    """The usable samples of a list file: paths, source lines and CSR-packed labels.

    Paths are kept as one byte blob plus offsets: ~18M Python strings would cost each rank GBs.
    """
    source: str
    path_blob: bytes
    path_offsets: np.ndarray  # int64 [N+1]
    lines: np.ndarray  # int64 [N], 1-based line in `source`
    indptr: np.ndarray  # int64 [N+1]
    classes: np.ndarray  # int32 [nnz]
    confs: np.ndarray  # float32 [nnz]

    def __len__(self) -> int:
        return len(self.lines)

    def path_bytes(self, i: int) -> bytes:
        o = self.path_offsets
        return self.path_blob[o[i]:o[i + 1]]

    def path(self, i: int) -> str:
        """The path as text; a non-UTF-8 name keeps its bytes as surrogates (os.fsdecode), so it opens."""
        return os.fsdecode(self.path_bytes(i))

    def line(self, i: int) -> int:
        return int(self.lines[i])

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.indptr[i], self.indptr[i + 1]
        return self.classes[a:b], self.confs[a:b]

    def positions(self, ids) -> np.ndarray:
        return np.asarray(ids, np.int64)

    def label_rows(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(first label position, label count) of each sample in `ids` (LabelTable's access)."""
        ids = np.asarray(ids, np.int64)
        start = self.indptr[ids].astype(np.int64)
        return start, self.indptr[ids + 1].astype(np.int64) - start

    def label_values(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.classes[pos].astype(np.int64), self.confs[pos].astype(np.float32)

    def max_class(self) -> int:
        return int(self.classes.max()) if len(self.classes) else -1

    def label_dict(self, i: int) -> dict[int, float]:
        c, f = self.labels(i)
        return {int(k): float(v) for k, v in zip(c, f)}

    def max_labels(self) -> int:
        return int(np.diff(self.indptr).max()) if len(self) else 0

    def subset(self, keep: np.ndarray) -> "LabelList":
        """The samples at positions `keep` (sorted), re-packed."""
        keep = np.asarray(keep, dtype=np.int64)
        path_offsets, ptake = csr_take(self.path_offsets, keep)
        indptr, take = csr_take(self.indptr, keep)
        blob = np.frombuffer(self.path_blob, np.uint8)[ptake].tobytes()
        return LabelList(self.source, blob, path_offsets, self.lines[keep], indptr, self.classes[take],
                         self.confs[take])


def read_list_file(path: str | Path, num_classes: int | None = None) -> tuple[LabelList, list[Issue]]:
    """Parse a list file in memory. Lines with errors are left out of the LabelList and reported as
    issues; duplicate paths keep their first line; a file without any sample line is an error.
    (The data index, index_build.py, runs the same parse streaming to disk.)"""
    src = str(path)
    blocks = list(iter_list_blocks(path, num_classes))
    paths = pa.chunked_array([b.paths for b in blocks], pa.binary()) if blocks else pa.chunked_array([], pa.binary())
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    lines = cat([b.lines for b in blocks], np.int64)
    counts = cat([b.counts for b in blocks], np.int64)
    classes = cat([b.classes for b in blocks], np.int32)
    confs = cat([b.confs for b in blocks], np.float32)
    blob, offsets = binary_blob(paths)
    hashes = np.concatenate([b.hashes for b in blocks]) if blocks else np.zeros(0, np.uint64)

    def raw(r: int) -> bytes:
        return blob[offsets[r]:offsets[r + 1]]
    keep, issues = list_issues(src, [i for b in blocks for i in b.issues], sum(b.num_lines for b in blocks), lines,
                               hashes, raw)
    issues += no_label_issues(src, np.flatnonzero(keep & (counts == 0)), lines, raw)
    issues.sort(key=lambda i: i.line)
    indptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    out = LabelList(src, blob, offsets, lines, indptr, classes, confs)
    if not keep.all():
        out = out.subset(np.flatnonzero(keep))
    return out, issues


def binary_blob(arr) -> tuple[bytes, np.ndarray]:
    """(concatenated bytes, int64 offsets) of a pyarrow (chunked) binary array."""
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    chunks = [c.cast(pa.large_binary()) for c in chunks if len(c)]
    if not chunks:
        return b"", np.zeros(1, np.int64)
    flat = pa.concat_arrays(chunks)
    off = np.frombuffer(flat.buffers()[1], np.int64)[flat.offset:flat.offset + len(flat) + 1]
    data = flat.buffers()[2]
    blob = data.to_pybytes()[off[0]:off[-1]] if data is not None else b""
    return blob, (off - off[0]).astype(np.int64)


def write_list_file(path: str | Path, entries) -> None:
    """entries: iterable of (image path, {class: conf}); writes the TAB-separated format."""
    with open(path, "w") as f:
        for p, labels in entries:
            toks = [f"{k}:{_fmt_conf(v)}" for k, v in sorted(labels.items())]
            f.write("\t".join([p, *toks]) + "\n")


def _fmt_conf(v: float) -> str:
    return "1" if v == 1.0 else f"{v:g}"
