"""Webdataset tar shards: writer, DALI index files, manifest and label table.

A shard folder holds
    shard-000000.tar   samples `<key>.jpg` (the image bytes), `<key>.id` (int64 little endian: the
                       sample id) and `<key>.json` ({"id", "path", "labels": [[idx, conf], ...]})
    shard-000000.idx   DALI's webdataset index (the format of DALI's wds2idx: "v1.2 <n>" then per
                       sample "ext offset size name" for each member)
    labels.npz         the label table by id (CSR: indptr, classes, confs), source lines/paths, and
                       `order`: the ids as written, shard after shard
    manifest.json      sample and shard counts, class count, source list, seed
Sample ids are positions in the source list after the invalid lines are dropped; samples are
shuffled across shards when written, since DALI's reader shuffles only inside a small buffer.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvpmtl.data.issues import DataError
from hvpmtl.data.tencent import LabelList

MANIFEST = "manifest.json"
LABELS = "labels.npz"
FORMAT = "hvpmtl-shards-v1"
INDEX_VERSION = "v1.2"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards from identical inputs
    tar.addfile(info, io.BytesIO(data))


def split_name(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): webdataset splits at the first dot of the basename."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def write_index(tar_path: str | Path, idx_path: str | Path | None = None) -> int:
    """Write DALI's index for one tar (what wds2idx writes); returns the sample count."""
    tar_path = Path(tar_path)
    idx_path = Path(idx_path) if idx_path else tar_path.with_suffix(".idx")
    samples: list[list[tuple[str, int, int, str]]] = []
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
    write_index_lines(idx_path, samples)
    return len(samples)


def write_index_lines(idx_path: str | Path, samples) -> None:
    with open(idx_path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(samples)}\n")
        for comps in samples:
            f.write(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) + "\n")


def read_index(idx_path: str | Path) -> list[list[tuple[str, int, int, str]]]:
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


def write_shards(list_file: str, root: str, out_dir: str, shard_size: int, *, seed: int = 0,
                 num_classes: int | None = None, labels: LabelList | None = None) -> dict:
    """Convert a list file to shuffled shards of `shard_size` samples (the last may be smaller).

    `labels` is the validated LabelList to write (what the validator kept); by default the list
    file is checked here and any error stops the conversion.
    """
    if shard_size <= 0:
        raise ValueError("shard_size must be > 0")
    if labels is None:
        from hvpmtl.data.validate import prepare_list
        labels, _ = prepare_list(list_file, root, num_classes=num_classes, skip_corrupt=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    if n == 0:
        raise DataError(f"{list_file}: no usable samples to shard")
    order = np.random.default_rng([seed, 7]).permutation(n)
    shards = []
    for s, start in enumerate(range(0, n, shard_size)):
        name = f"shard-{s:06d}"
        tar_path = out / f"{name}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in order[start:start + shard_size]:
                i = int(i)
                key = f"{i:09d}"
                cls, conf = labels.labels(i)
                meta = {"id": i, "path": labels.path(i),
                        "labels": [[int(c), float(f)] for c, f in zip(cls, conf)]}
                _add(tf, f"{key}.jpg", (Path(root) / labels.path(i)).read_bytes())
                _add(tf, f"{key}.id", np.int64(i).tobytes())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
        count = write_index(tar_path)
        shards.append({"name": f"{name}.tar", "samples": count})
    np.savez(out / LABELS, order=order, indptr=labels.indptr, classes=labels.classes, confs=labels.confs,
             lines=labels.lines, path_blob=np.frombuffer(labels.path_blob, np.uint8),
             path_offsets=labels.path_offsets)
    manifest = {"format": FORMAT, "num_samples": n, "num_classes": num_classes, "shard_size": shard_size,
                "shards": shards, "source_list": str(list_file), "root": str(root), "seed": seed}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass
class ShardSet:
    folder: Path
    manifest: dict
    labels: LabelList  # indexed by sample id
    order: np.ndarray | None  # the ids as written, shard after shard

    @property
    def tars(self) -> list[Path]:
        return [self.folder / s["name"] for s in self.manifest["shards"]]


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
    try:
        z = np.load(folder / LABELS)
    except OSError:
        raise DataError(f"{folder / LABELS}: missing label table; rewrite the shards") from None
    labels = LabelList(manifest.get("source_list", str(folder)), z["path_blob"].tobytes(), z["path_offsets"],
                       z["lines"], z["indptr"], z["classes"], z["confs"])
    return ShardSet(folder, manifest, labels, z["order"] if "order" in z.files else None)
