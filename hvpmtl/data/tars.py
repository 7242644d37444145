"""Webdataset tar shards, the read side: the one tar walker, DALI's index files, the shard folder's
manifest and label record. The writer is in shards.py.

A shard folder holds
    shard-000000.tar   samples `<key>.jpg` (the image bytes), `<key>.id` (int64 little endian: the
                       sample id) and `<key>.json` ({"id", "path", "labels": [[idx, conf], ...]})
    shard-000000.idx   DALI's webdataset index (the format of DALI's wds2idx: "v1.2 <n>" then per
                       sample "ext offset size name" for each member)
    labels.npz         the writer's record: the label table by id (CSR: indptr, classes, confs),
                       source lines/paths, `order` (the ids as written, shard after shard) and the
                       image checks made while writing (verdict, width, height)
    manifest.json      sample and shard counts, class count, source list, seed, per shard its sample
                       count and tar size
Training reads none of the tars' contents at start-up: it maps the data index built from these
files (hvpmtl/data/index.py).
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvpmtl.data.issues import DataError

MANIFEST = "manifest.json"
LABELS = "labels.npz"
FORMAT = "hvpmtl-shards-v1"
INDEX_VERSION = "v1.2"

Member = tuple[str, int, int, str]  # (ext, data offset, size, member name)


def split_name(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): webdataset splits at the first dot of the basename."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def tar_samples(tar_path: str | Path) -> list[list[Member]]:
    """The tar's samples, each a list of its members, in tar order. What DALI's wds2idx groups as one
    sample: consecutive regular files with the same key; directory-like keys are left out.
    Raises tarfile.TarError / OSError for an unreadable tar."""
    samples: list[list[Member]] = []
    last = None
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isreg():
                continue
            key, ext = split_name(m.name)
            if not key or key.endswith("/"):
                continue
            if key != last:
                samples.append([])
                last = key
            samples[-1].append((ext, m.offset_data, m.size, m.name))
    return samples


def sample_key(members: list[Member]) -> str:
    return split_name(members[0][3])[0]


def write_index_lines(idx_path: str | Path, samples: list[list[Member]]) -> None:
    with open(idx_path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(samples)}\n")
        for comps in samples:
            f.write(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) + "\n")


def write_index(tar_path: str | Path, idx_path: str | Path | None = None) -> int:
    """Write DALI's index for one tar (what wds2idx writes); returns the sample count."""
    tar_path = Path(tar_path)
    samples = tar_samples(tar_path)
    write_index_lines(Path(idx_path) if idx_path else tar_path.with_suffix(".idx"), samples)
    return len(samples)


def read_index(idx_path: str | Path) -> list[list[Member]]:
    """Samples of a DALI index: per sample a list of (ext, offset, size, name)."""
    lines = Path(idx_path).read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise DataError(f"{idx_path}:1: not a DALI {INDEX_VERSION} webdataset index; rewrite it with "
                        "`hvpmtl data index-shards`")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        t = line.split()
        if len(t) % 4:
            raise DataError(f"{idx_path}:{n}: expected groups of 'ext offset size name'")
        out.append([(t[i], int(t[i + 1]), int(t[i + 2]), t[i + 3]) for i in range(0, len(t), 4)])
    if len(out) != int(head[1]):
        raise DataError(f"{idx_path}:1: header says {head[1]} samples, the file lists {len(out)}")
    return out


def filter_index(idx_path: str | Path, out_path: str | Path, drop: set[int]) -> int:
    """Copy a DALI index without the samples at 1-based positions `drop` (text only, no tar read);
    returns the samples kept."""
    samples = read_index(idx_path)
    kept = [s for pos, s in enumerate(samples, start=1) if pos not in drop]
    write_index_lines(out_path, kept)
    return len(kept)


def index_end(idx_path: str | Path) -> int:
    """The largest byte offset the index points at (a cheap staleness check against the tar's size)."""
    return max((o + n for comps in read_index(idx_path) for _, o, n, _ in comps), default=0)


@dataclass
class ShardSet:
    folder: Path
    manifest: dict

    @property
    def tars(self) -> list[Path]:
        return [self.folder / s["name"] for s in self.manifest["shards"]]

    def record(self):
        """labels.npz (the writer's record); read by `hvpmtl data index`, never at training start-up."""
        try:
            return np.load(self.folder / LABELS)
        except OSError:
            raise DataError(f"{self.folder / LABELS}: missing label table; rewrite the shards") from None


def load_shard_set(folder: str | Path) -> ShardSet:
    folder = Path(folder)
    mpath = folder / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except OSError:
        raise DataError(f"{mpath}: no shard manifest; write shards with `hvpmtl data to-shards`") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{mpath}: format '{manifest.get('format')}', expected '{FORMAT}'")
    return ShardSet(folder, manifest)
