"""Tencent ML-Images dictionary files.

TAB separated, header `category_index<TAB>category_id<TAB>index_of_parent_category<TAB>category name`, one
row per class in index order, parent -1 for roots; names may hold commas.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvpmtl.data.formats.issues import DataError, make_issue

DICTIONARY_HEADER = "category_index\tcategory_id\tindex_of_parent_category\tcategory name"


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
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read dictionary {src}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(make_issue("bad-dictionary", src, line, f"not UTF-8 (byte 0x{raw[e.start]:02x}); save the "
                                   "dictionary as UTF-8").format()) from None
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
