"""Tencent ML-Images list and dictionary files.

List file: one image per line, whitespace separated (TABs in the released files):
    path<TAB>idx:conf<TAB>idx:conf ...
idx is a 0-based class index, conf in (0, 1] (1, 0.9 and 0.8 occur). Paths are relative to an
image root and hold no whitespace.

Dictionary: TAB separated, header `category_index<TAB>category_id<TAB>index_of_parent_category
<TAB>category name`, one row per class in index order, parent -1 for roots; names may hold commas.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvpmtl.data.issues import DataError, Issue, make_issue

DICTIONARY_HEADER = "category_index\tcategory_id\tindex_of_parent_category\tcategory name"


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

    def path(self, i: int) -> str:
        o = self.path_offsets
        return self.path_blob[o[i]:o[i + 1]].decode()

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.indptr[i], self.indptr[i + 1]
        return self.classes[a:b], self.confs[a:b]

    def label_dict(self, i: int) -> dict[int, float]:
        c, f = self.labels(i)
        return {int(k): float(v) for k, v in zip(c, f)}

    def max_labels(self) -> int:
        return int(np.diff(self.indptr).max()) if len(self) else 0

    def subset(self, keep: np.ndarray) -> "LabelList":
        """The samples at positions `keep` (sorted), re-packed."""
        keep = np.asarray(keep, dtype=np.int64)
        o = self.path_offsets
        paths = [self.path_blob[o[i]:o[i + 1]] for i in keep]
        counts = np.diff(self.indptr)[keep]
        indptr = np.zeros(len(keep) + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        # position j of the new arrays reads old position starts[seg] + (j - indptr[seg])
        take = np.repeat(self.indptr[keep] - indptr[:-1], counts) + np.arange(indptr[-1])
        return LabelList(self.source, b"".join(paths), _offsets(paths), self.lines[keep], indptr,
                         self.classes[take], self.confs[take])


def _offsets(parts: list[bytes]) -> np.ndarray:
    out = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=out[1:])
    return out


def parse_label(token: str) -> tuple[int, float]:
    """'12:0.9' -> (12, 0.9); ValueError when malformed."""
    idx_s, sep, conf_s = token.partition(":")
    if not sep or not idx_s or not conf_s:
        raise ValueError(f"label '{token}' is not idx:conf")
    try:
        return int(idx_s), float(conf_s)
    except ValueError:
        raise ValueError(f"label '{token}' is not idx:conf with an integer idx and a number conf") from None


CHUNK = 65536  # lines parsed together by the vectorised path
_TWO_COLONS = re.compile(rb":\S*:")


def _fast_chunk(lines: list[bytes], num_classes: int | None):
    """Vectorised parse of well-formed lines: (paths, counts, classes, confs), or None when any
    line needs the per-line parser (to report it, or for rare shapes like empty lines)."""
    paths, rests = [], []
    for line in lines:
        parts = line.split(None, 1)
        if not parts:
            return None
        paths.append(parts[0])
        rests.append(parts[1] if len(parts) > 1 else b"")
    counts = np.fromiter((r.count(b":") for r in rests), np.int64, len(rests))
    blob = b" ".join(rests)
    nnz = int(counts.sum())
    # every token must hold exactly one colon with text on both sides
    if len(blob.split()) != nnz or _TWO_COLONS.search(blob):
        return None
    toks = blob.replace(b":", b" ").split()
    if len(toks) != 2 * nnz:
        return None
    try:  # int() and float() as the per-line parser uses them, so both paths accept the same tokens
        idx = np.fromiter(map(int, toks[0::2]), np.int64, nnz)
        conf = np.fromiter(map(float, toks[1::2]), np.float64, nnz)
    except ValueError:
        return None
    if not (np.all(idx >= 0) and np.all((conf > 0) & (conf <= 1))):
        return None
    if num_classes is not None and np.any(idx >= num_classes):
        return None
    row = np.repeat(np.arange(len(lines)), counts)
    order = np.lexsort((idx, row))  # labels sorted by class within a line, as the per-line parser does
    idx, conf, row = idx[order], conf[order], row[order]
    if nnz > 1 and np.any((row[1:] == row[:-1]) & (idx[1:] == idx[:-1])):
        return None  # a class twice on one line: the per-line parser reports it
    return paths, counts, idx.astype(np.int32), conf.astype(np.float32)


def _slow_line(line: bytes, n: int, src: str, num_classes: int | None, issues: list):
    """(path, {class: conf}) of one line, or None with its issue appended."""
    parts = line.split()
    if not parts:
        issues.append(make_issue("empty-line", src, n))
        return None
    p = parts[0]
    ptxt = p.decode(errors="replace")
    labels: dict[int, float] = {}
    try:
        for tok in parts[1:]:
            k, c = parse_label(tok.decode(errors="replace"))
            if num_classes is not None and not 0 <= k < num_classes:
                raise _LineIssue("bad-index", f"class index {k} in '{tok.decode()}' not in [0, {num_classes})")
            if k < 0:
                raise _LineIssue("bad-index", f"class index {k} in '{tok.decode()}' is negative")
            if not (0.0 < c <= 1.0) or math.isnan(c):
                raise _LineIssue("bad-conf", f"confidence {c} in '{tok.decode()}' not in (0, 1]")
            if k in labels:
                issues.append(make_issue("duplicate-label", src, n, f"class {k} listed twice", ptxt))
                c = max(c, labels[k])
            labels[k] = c
    except ValueError as e:
        issues.append(make_issue("malformed", src, n, str(e), ptxt))
        return None
    except _LineIssue as e:
        issues.append(make_issue(e.code, src, n, e.detail, ptxt))
        return None
    return p, labels


def read_list_file(path: str | Path, num_classes: int | None = None) -> tuple[LabelList, list[Issue]]:
    """Parse a list file. Lines with errors are left out of the LabelList and reported as issues;
    duplicate paths keep their first line. Clean chunks take a faster path (~100k lines/s on one core)."""
    src = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read list file {src}: {e.strerror}") from None
    issues: list[Issue] = []
    all_lines = raw.splitlines()
    del raw
    paths: list[bytes] = []
    line_nos, counts, classes, confs = [], [], [], []
    seen: set = set()
    first_line: dict | None = None  # path -> first line, built on the first duplicate
    for cs in range(0, len(all_lines), CHUNK):
        chunk = all_lines[cs:cs + CHUNK]
        fast = _fast_chunk(chunk, num_classes)
        if fast is not None:
            c_paths, c_counts, c_cls, c_conf = fast
            c_lines = np.arange(cs + 1, cs + 1 + len(chunk), dtype=np.int64)
        else:
            c_paths, c_lines, c_counts, cls_l, conf_l = [], [], [], [], []
            for j, line in enumerate(chunk):
                r = _slow_line(line, cs + j + 1, src, num_classes, issues)
                if r is None:
                    continue
                c_paths.append(r[0])
                c_lines.append(cs + j + 1)
                c_counts.append(len(r[1]))
                for k in sorted(r[1]):
                    cls_l.append(k)
                    conf_l.append(r[1][k])
            c_lines, c_counts = np.asarray(c_lines, np.int64), np.asarray(c_counts, np.int64)
            c_cls, c_conf = np.asarray(cls_l, np.int32), np.asarray(conf_l, np.float32)
        # duplicate paths: the later line goes
        keep = np.ones(len(c_paths), bool)
        before = len(seen)
        seen.update(c_paths)
        if len(seen) - before != len(c_paths):
            if first_line is None:
                first_line = {p: int(n) for p, n in zip(paths, np.concatenate(line_nos) if line_nos else [])}
            for j, p in enumerate(c_paths):
                if p in first_line:
                    keep[j] = False
                    issues.append(make_issue("duplicate-path", src, int(c_lines[j]),
                                             f"already on line {first_line[p]}", p.decode(errors="replace")))
                else:
                    first_line[p] = int(c_lines[j])
        elif first_line is not None:
            first_line.update(zip(c_paths, c_lines.tolist()))
        for j in np.flatnonzero(keep & (c_counts == 0)):
            issues.append(make_issue("no-labels", src, int(c_lines[j]), "", c_paths[j].decode(errors="replace")))
        if not keep.all():
            lab_keep = np.repeat(keep, c_counts)
            c_cls, c_conf = c_cls[lab_keep], c_conf[lab_keep]
            c_paths = [p for p, k in zip(c_paths, keep) if k]
            c_lines, c_counts = c_lines[keep], c_counts[keep]
        paths += c_paths
        line_nos.append(c_lines)
        counts.append(c_counts)
        classes.append(c_cls)
        confs.append(c_conf)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    cnt = cat(counts, np.int64)
    indptr = np.zeros(len(cnt) + 1, np.int64)
    np.cumsum(cnt, out=indptr[1:])
    issues.sort(key=lambda i: i.line)
    out = LabelList(src, b"".join(paths), _offsets(paths), cat(line_nos, np.int64), indptr,
                    cat(classes, np.int32), cat(confs, np.float32))
    return out, issues


class _LineIssue(Exception):
    def __init__(self, code: str, detail: str):
        self.code, self.detail = code, detail


def write_list_file(path: str | Path, entries) -> None:
    """entries: iterable of (image path, {class: conf}); writes the TAB-separated format."""
    with open(path, "w") as f:
        for p, labels in entries:
            toks = [f"{k}:{_fmt_conf(v)}" for k, v in sorted(labels.items())]
            f.write("\t".join([p, *toks]) + "\n")


def _fmt_conf(v: float) -> str:
    return "1" if v == 1.0 else f"{v:g}"


@dataclass
class Dictionary:
    ids: list[str]
    names: list[str]
    parents: np.ndarray  # int64 [C], -1 for roots

    def __len__(self) -> int:
        return len(self.ids)

    def ancestors(self, i: int) -> list[int]:
        out = []
        while self.parents[i] >= 0:
            i = int(self.parents[i])
            out.append(i)
        return out


def read_dictionary(path: str | Path) -> Dictionary:
    """Parse a dictionary file; DataError naming file:line on a bad row, parent or cycle."""
    src = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise DataError(f"cannot read dictionary {src}: {e.strerror}") from None
    ids, names, parents = [], [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if n == 1 and line.startswith("category_index"):
            continue
        if not line.strip():
            continue
        cols = line.split("\t", 3)
        try:
            if len(cols) != 4:
                raise ValueError(f"{len(cols)} TAB-separated columns, expected 4")
            idx, parent = int(cols[0]), int(cols[2])
        except ValueError as e:
            raise DataError(make_issue("bad-dictionary", src, n, str(e)).format()) from None
        if idx != len(ids):
            raise DataError(make_issue("bad-dictionary", src, n, f"category_index {idx}, expected {len(ids)} "
                                       "(rows must be in index order)").format())
        ids.append(cols[1])
        names.append(cols[3])
        parents.append(parent)
    par = np.asarray(parents, np.int64)
    c = len(ids)
    for i, p in enumerate(par):
        if p < -1 or p >= c or p == i:
            raise DataError(make_issue("bad-dictionary", src, 0, f"class {i} has parent {p}, not -1 or another "
                                       f"class in [0, {c})").format())
    d = Dictionary(ids, names, par)
    for i in range(c):  # a cycle would loop for ever in ancestors()
        seen, j = set(), i
        while j >= 0:
            if j in seen:
                raise DataError(make_issue("bad-dictionary", src, 0, f"class {i}'s parents form a cycle").format())
            seen.add(j)
            j = int(par[j])
    return d


def write_dictionary(path: str | Path, d: Dictionary) -> None:
    with open(path, "w") as f:
        f.write(DICTIONARY_HEADER + "\n")
        for i, (cid, p, name) in enumerate(zip(d.ids, d.parents, d.names)):
            f.write(f"{i}\t{cid}\t{int(p)}\t{name}\n")
