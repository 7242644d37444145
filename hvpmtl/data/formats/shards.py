"""Webdataset tar shards, the read side: the one tar walker, DALI's index files, the shard folder's
manifest and label record. The writer is hvpmtl/data/tools/to_shards.py.

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
files (index_format.py).
"""
from __future__ import annotations

import json
import os
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvpmtl.data.formats.issues import DataError

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
    Raises tarfile.TarError / OSError for an unreadable tar (readable_samples says how much is usable)."""
    samples, damage = readable_samples(tar_path)
    if damage:
        raise tarfile.ReadError(damage)
    return samples


def readable_samples(tar_path: str | Path) -> tuple[list[list[Member]], str]:
    """(the complete samples of the tar, '' or what is wrong with it). A truncated or damaged tar gives the
    samples before the damage, less the sample it cut (its other members may be lost); members whose data
    run past the end of the file are never counted. OSError (missing, unreadable) is raised."""
    tar_path = Path(tar_path)
    size = tar_path.stat().st_size
    samples: list[list[Member]] = []
    last, damage, cut = None, "", False
    try:
        with tarfile.open(tar_path) as tf:
            for m in tf:
                if not m.isreg():
                    continue
                key, ext = split_name(m.name)
                if m.offset_data + m.size > size:
                    damage = f"member {m.name} runs past the end of the file ({size} bytes)"
                    cut = key == last
                    break
                if not key or key.endswith("/"):
                    continue
                if key != last:
                    samples.append([])
                    last = key
                samples[-1].append((ext, m.offset_data, m.size, m.name))
    except (tarfile.TarError, EOFError, UnicodeDecodeError) as e:  # tarfile reports a cut header as ReadError
        damage = f"not a readable tar: {e}" if not samples else f"damaged after sample {len(samples)}: {e}"
        # an unreadable header may have been the last sample's next member: keep it only when it has them all
        cut = bool(samples) and {c[0] for c in samples[-1]} != {c[0] for c in samples[0]}
    if cut:
        samples.pop()
    return samples, damage


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


def rewrite_index(tar_path: str | Path) -> tuple[int, str]:
    """`hvpmtl data index-shards` for one tar: index its readable samples (a new file, then renamed, so a
    reader never sees half an index); returns (samples indexed, '' or what was lost and why)."""
    tar_path = Path(tar_path)
    samples, damage = readable_samples(tar_path)
    idx = tar_path.with_suffix(".idx")
    tmp = idx.with_name(f".{idx.name}.tmp-{os.getpid()}")
    try:
        write_index_lines(tmp, samples)
        os.replace(tmp, idx)
    finally:
        tmp.unlink(missing_ok=True)
    return len(samples), damage


def _index_text(idx_path: str | Path, first_line_only: bool = False) -> tuple[list[str], int, str]:
    """(the lines of a DALI index, the sample count its header says, the advice for a bad one)."""
    fix = f"rewrite it with `hvpmtl data index-shards {Path(idx_path).parent}`"
    try:
        if first_line_only:
            with open(idx_path, encoding="utf-8") as f:
                lines = [f.readline()]
        else:
            lines = Path(idx_path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{idx_path}: not a text file (byte {e.start}: {e.reason}); {fix}") from None
    except OSError as e:
        raise DataError(f"{idx_path}: cannot read the DALI index: {e.strerror}; {fix}") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise DataError(f"{idx_path}:1: not a DALI {INDEX_VERSION} webdataset index; {fix}")
    return lines, int(head[1]), fix


def index_count(idx_path: str | Path) -> int:
    """The sample count a DALI index's header says (its first line only)."""
    return _index_text(idx_path, first_line_only=True)[1]


def read_index(idx_path: str | Path) -> list[list[Member]]:
    """Samples of a DALI index: per sample a list of (ext, offset, size, name); DataError naming file:line.
    The one parser of DALI index files."""
    lines, count, fix = _index_text(idx_path)
    out = []
    for n, line in enumerate(lines[1:], start=2):
        t = line.split()
        if not t or len(t) % 4:
            raise DataError(f"{idx_path}:{n}: expected groups of 'ext offset size name'; {fix}")
        try:
            out.append([(t[i], int(t[i + 1]), int(t[i + 2]), t[i + 3]) for i in range(0, len(t), 4)])
        except ValueError:
            raise DataError(f"{idx_path}:{n}: offset and size must be integers; {fix}") from None
        if any(o < 0 or sz < 0 for _, o, sz, _ in out[-1]):
            raise DataError(f"{idx_path}:{n}: negative offset or size; {fix}")
    if len(out) != count:
        raise DataError(f"{idx_path}:1: header says {count} samples, the file lists {len(out)}; {fix}")
    return out


def filter_index(idx_path: str | Path, out_path: str | Path, drop: set[int]) -> int:
    """Copy a DALI index without the samples at 1-based positions `drop` (text only, no tar read);
    returns the samples kept."""
    samples = read_index(idx_path)
    kept = [s for pos, s in enumerate(samples, start=1) if pos not in drop]
    write_index_lines(out_path, kept)
    return len(kept)


def samples_end(samples: list[list[Member]]) -> int:
    """The largest byte offset an index's samples point at (a cheap staleness check against the tar's size)."""
    return max((o + n for comps in samples for _, o, n, _ in comps), default=0)


# labels.npz members every reader needs (to-shards writes more: order, verdicts, sizes)
RECORD_KEYS = ("indptr", "classes", "confs", "lines", "path_blob", "path_offsets")


class Record:
    """labels.npz, opened lazily (it is large at 17.6M samples); a damaged member is a DataError naming it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._npz = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{path}: missing label table; rewrite the shards (`hvpmtl data to-shards`)") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read the label table: {e.strerror or e}; rewrite the shards") from None
        except (ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{path}: not a label table written by to-shards ({e}); rewrite the shards") from None
        self.files = list(self._npz.files)
        lost = [k for k in RECORD_KEYS if k not in self.files]
        if lost:
            raise DataError(f"{path}: no member {', '.join(lost)}; rewrite the shards")

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._npz[key]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise DataError(f"{self.path}: member {key} cannot be read ({e}); rewrite the shards") from None

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def check(self) -> None:
        """The CSR tables agree with each other (what building the data index relies on)."""
        lines, indptr, offs = self["lines"], self["indptr"], self["path_offsets"]
        n = len(lines)
        for name, a, size in (("indptr", indptr, len(self["classes"])), ("path_offsets", offs, len(self["path_blob"]))):
            if a.ndim != 1 or len(a) != n + 1 or not np.issubdtype(a.dtype, np.integer) or                     (n and (a[0] != 0 or a[-1] != size or np.any(np.diff(a) < 0))):
                raise DataError(f"{self.path}: member {name} is not an offset table for {n} samples; "
                                "rewrite the shards")
        if len(self["confs"]) != len(self["classes"]):
            raise DataError(f"{self.path}: members classes and confs differ in length; rewrite the shards")


@dataclass
class ShardSet:
    folder: Path
    manifest: dict

    @property
    def tars(self) -> list[Path]:
        return [self.folder / s["name"] for s in self.manifest["shards"]]

    def record(self) -> Record:
        """labels.npz (the writer's record); read by `hvpmtl data index`, never at training start-up."""
        return Record(self.folder / LABELS)


def load_shard_set(folder: str | Path) -> ShardSet:
    folder = Path(folder)
    mpath = folder / MANIFEST
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{mpath}: no shard manifest; write shards with `hvpmtl data to-shards`") from None
    except OSError as e:
        raise DataError(f"{mpath}: cannot read the shard manifest: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{mpath}: expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{mpath}: format '{manifest.get('format')}', expected '{FORMAT}'")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DataError(f"{mpath}: 'shards' must be a list of {{name, samples, ...}}; rewrite the shards")
    for n, s in enumerate(shards):
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or not name.endswith(".tar") or "/" in name or name.startswith("."):
            raise DataError(f"{mpath}: shards[{n}] must be an object whose 'name' is a .tar file in the folder")
    k = manifest.get("num_classes")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k <= 0):
        raise DataError(f"{mpath}: 'num_classes' must be a positive integer or null, found {k!r}")
    return ShardSet(folder, manifest)


def diagnose(folder: str | Path) -> DataError | None:
    """The first problem in a shard folder's metadata (manifest, labels.npz, each tar's .idx against the
    tar's size), as a DataError naming the file and member; None when none is found. Used to name the
    file behind an error from a reader that does not (cheap: no tar content is read)."""
    try:
        ss = load_shard_set(folder)
        ss.record().check()
        for tar in ss.tars:
            idx = tar.with_suffix(".idx")
            if not tar.exists():
                return DataError(f"{tar}: listed in {MANIFEST} but missing; restore it or rewrite the shards")
            if not idx.exists():
                return DataError(f"{idx}: no DALI index beside {tar.name}; write it with "
                                 f"`hvpmtl data index-shards {folder}`")
            if samples_end(read_index(idx)) > tar.stat().st_size:
                return DataError(f"{idx}: points past the end of {tar.name} (a truncated tar or a stale index); "
                                 f"`hvpmtl data index-shards {folder}` rewrites it for the samples still readable")
    except DataError as e:
        return e
    except OSError as e:
        return DataError(f"{e.filename or folder}: {e.strerror or e}")
    return None
