"""The usable samples of a data set, ready for a loader: list files and shards from their data index,
ImageFolders from a folder listing; the skip policy; the count of what was left out and why.

Start-up opens no image and reads no JPEG byte: what is known to be bad comes from the index (the
parse issues, and the verdicts `hvpmtl data validate` or `to-shards` wrote into it); samples nobody
checked yet are checked when the loader reads them (hvpmtl/data/loaders/file_reader.py).

Policy (docs/DATA.md): a data set with known-bad samples is refused (DataError naming the first ones
as file:line) unless `data.skip_list` (the validator's list; trusted) or `data.skip_corrupt: true`
leaves them out. What is left out is counted by reason in `Skipped`.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from hvpmtl.data.formats import jpeg
from hvpmtl.data.formats.index_file import DataIndex
from hvpmtl.data.formats.index_format import FIRST_ERROR, UNCHECKED, VERDICT, VERDICTS
from hvpmtl.data.formats.index_fresh import ensure_index
from hvpmtl.data.formats.issues import DataError, Issue, make_issue, refusal
from hvpmtl.data.formats.list_file import LabelList
from hvpmtl.data.formats.shards import diagnose, filter_index, load_shard_set

SKIP_HEADER = "# hvpmtl skip list: file<TAB>line<TAB>path-or-key<TAB>code"
SCAN_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- what was left out


@dataclass
class Skipped:
    """Samples left out, by reason: lines that do not parse, lines named by data.skip_list, samples
    with known errors dropped by data.skip_corrupt, and (updated while training, per rank) samples
    that failed when read and were replaced by the next readable one."""
    parse_errors: int = 0
    skip_list: int = 0
    skip_corrupt: int = 0
    runtime: int = 0
    total: int = 0  # samples in the data set, usable or not

    @property
    def at_start(self) -> int:
        return self.parse_errors + self.skip_list + self.skip_corrupt

    @property
    def left_out(self) -> int:
        return self.at_start + self.runtime

    def as_dict(self) -> dict:
        return {"parse_errors": self.parse_errors, "skip_list": self.skip_list, "skip_corrupt": self.skip_corrupt,
                "runtime": self.runtime, "left_out": self.left_out, "total": self.total}

    def describe(self) -> str:
        parts = [f"{self.parse_errors} parse errors", f"{self.skip_list} skip list", f"{self.skip_corrupt} skip_corrupt",
                 f"{self.runtime} failed when read"]
        return f"{self.left_out} of {self.total} samples left out: " + ", ".join(parts)


# ----------------------------------------------------------------------------- samples over an index


class IndexedSamples:
    """The usable samples: dense ids 0..len-1 at index positions `keep` (None: all of them). Paths and
    labels are read from the index file per batch (pread); nothing per sample is copied.

    Each batch's reads are checked first, on that batch's values only (the index is not scanned): the
    file still the one mapped (one fstat: an index overwritten in place is a DataError, not a SIGBUS),
    label rows inside the label arrays and no longer than the longest row written, class ids in
    [0, max_class], confidence codes inside the table, path slices inside the path blob. A damaged
    index is a DataError naming the index and the sample."""

    MAX_PATH = 4096  # bytes: PATH_MAX on Linux

    def __init__(self, index: DataIndex, keep: Optional[np.ndarray] = None, source: Optional[str] = None):
        self.index, self.keep = index, keep
        self.source = source or index.source
        self._lines = None
        h = index.header
        self._nnz, self._top = int(h.get("nnz", 0)), int(h.get("max_class", -1))
        self._max_labels = int(h.get("max_labels", self._nnz))
        table = h.get("conf_table")
        self._codes = len(table) if table is not None and index.confs.dtype == np.uint8 else None

    def __len__(self) -> int:
        return self.index.num_samples if self.keep is None else len(self.keep)

    def positions(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        return ids if self.keep is None else self.keep[ids].astype(np.int64)

    def position(self, i: int) -> int:
        return int(i) if self.keep is None else int(self.keep[int(i)])

    def _damaged(self, pos: int, what: str) -> DataError:
        idx = self.index
        try:
            where = f"{self.source}:{int(idx.lines[pos])}"
        except (IndexError, ValueError):
            where = self.source
        return DataError(f"{idx.path}: damaged data index at sample {pos} ({where}): {what}. Rebuild it with "
                         f"`hvpmtl data index ... --force` (into a new file: never overwrite an index in place), "
                         "then restart")

    def path_bytes(self, i: int) -> bytes:
        idx = self.index
        p = self.position(i)
        a, b = (int(x) for x in idx.take("path_offsets", [p, p + 1]))
        if not 0 <= a <= b <= len(idx.path_blob) or b - a > self.MAX_PATH:
            raise self._damaged(p, f"its path runs from byte {a} to {b} of {len(idx.path_blob)}")
        return idx.take("path_blob", np.arange(a, b)).tobytes()

    def path(self, i: int) -> str:
        return os.fsdecode(self.path_bytes(i))

    def line(self, i: int) -> int:
        return int(self.index.lines[self.position(i)])

    @property
    def lines(self) -> np.ndarray:
        """Every sample's line (materialised on first use: for messages and tests, not the hot path)."""
        if self._lines is None:
            self._lines = np.asarray(self.index.lines if self.keep is None else self.index.lines[self.keep], np.int64)
        return self._lines

    def label_rows(self, ids) -> tuple[np.ndarray, np.ndarray]:
        pos = self.positions(ids)
        ends = self.index.take("indptr", np.stack([pos, pos + 1], 1)).reshape(-1, 2).astype(np.int64)
        start, end = ends[:, 0], ends[:, 1]
        count = end - start
        bad = (start < 0) | (count < 0) | (end > self._nnz) | (count > self._max_labels)
        if bad.any():
            j = int(np.argmax(bad))
            raise self._damaged(int(pos[j]), f"its labels are rows {int(start[j])} to {int(end[j])} of {self._nnz} "
                                             f"(at most {self._max_labels} per sample were written)")
        return start, count

    def label_values(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = self.index
        cls = idx.take("classes", pos)
        bad = (cls < 0) | (cls > self._top)
        raw = idx.take("confs", pos)
        bad_conf = (raw >= self._codes) if self._codes is not None else ~((raw > 0) & (raw <= 1))
        if bad.any() or bad_conf.any():
            at = int(pos[int(np.argmax(bad | bad_conf))])
            sample = int(np.searchsorted(idx.indptr, at, side="right")) - 1
            what = f"class id {int(cls[np.argmax(bad)])} outside [0, {self._top}]" if bad.any() else \
                f"confidence {'code ' if self._codes is not None else ''}{raw[np.argmax(bad_conf)]} outside " + \
                (f"its table of {self._codes}" if self._codes is not None else "(0, 1]")
            raise self._damaged(sample, what)
        return cls.astype(np.int64), idx.decode_confs(raw)

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, c = self.label_rows([i])
        pos = np.arange(s[0], s[0] + c[0])
        return self.label_values(pos)

    def label_dict(self, i: int) -> dict[int, float]:
        c, f = self.labels(i)
        return {int(k): float(v) for k, v in zip(c, f)}

    def max_class(self) -> int:
        return int(self.index.header.get("max_class", -1))

    def subset(self, keep: np.ndarray) -> "IndexedSamples":
        return IndexedSamples(self.index, self.positions(keep).astype(np.int32), self.source)


# ----------------------------------------------------------------------------- the prepared data set


@dataclass
class ShardPlan:
    """What fn.readers.webdataset reads: the tars with usable samples and their DALI indices (filtered
    copies in a temporary folder where samples are left out)."""
    folder: Path
    tars: list[str]
    index_paths: list[str]
    stored_ids: Optional[np.ndarray]  # sorted stored ids of the usable samples (None: all, dense = stored)
    tmpdir: Optional[tempfile.TemporaryDirectory] = None

    def dense(self, stored: np.ndarray) -> np.ndarray:
        """Loader sample ids for the ids stored in the tars."""
        stored = np.asarray(stored, np.int64)
        return stored if self.stored_ids is None else np.searchsorted(self.stored_ids, stored).astype(np.int64)


@dataclass
class Prepared:
    samples: object  # IndexedSamples or LabelList
    skipped: Skipped
    shards: Optional[ShardPlan] = None
    unchecked: int = 0  # usable samples with no verdict yet: checked when read
    index: Optional[DataIndex] = None
    notes: list = field(default_factory=list)


@dataclass
class IndexOptions:
    """Where the index is and who may build it (DataConfig's index, index_auto_build, index_wait_s)."""
    path: str = ""
    auto_build_max: int = 1_000_000
    wait_s: float = 600.0
    builder: bool = True  # this process may build a missing index (one per node: local rank 0)
    log: Callable[[str], None] = print


def read_skip_list(path: str) -> dict[tuple[str, int], tuple[str, str]]:
    """(file name, line or shard sample position) -> (path or key, code)."""
    out: dict = {}
    try:
        text = Path(path).read_text(errors="surrogateescape")
    except OSError as e:
        raise DataError(f"cannot read skip list {path}: {e.strerror}") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        t = line.split("\t")
        if len(t) != 4 or not t[1].isdigit():
            raise DataError(f"{path}:{n}: expected 'file<TAB>line<TAB>path<TAB>code' as written by "
                            "`hvpmtl data validate --write-skip-list`")
        out[(Path(t[0]).name, int(t[1]))] = (t[2], t[3])
    return out


def _chunks(n: int):
    for s in range(0, n, SCAN_CHUNK):
        yield s, min(n, s + SCAN_CHUNK)


def bad_samples(index: DataIndex, max_pixels: int, trust_verdicts: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(positions, verdict codes) of samples known to be unusable: a validator error, or more pixels
    than max_pixels by the recorded JPEG size; in chunks, so no per-sample temporary is big."""
    pos, codes = [], []
    v, w, h = index.verdict, index.width, index.height
    shard = index.arrays.get("shard")
    hd = index.header
    nothing = (not hd.get("verdicts") or not trust_verdicts or
               (hd.get("verdict_errors") == 0 and (not max_pixels or hd.get("max_image_pixels", 2**62) <= max_pixels)))
    if nothing and (shard is None or hd.get("absent") == 0):  # the header says so: no page of the arrays is read
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    for a, b in _chunks(len(index)):
        code = v[a:b] if trust_verdicts else np.zeros(b - a, np.uint8)
        code = np.where(code >= FIRST_ERROR, code, 0).astype(np.uint8)
        if max_pixels and trust_verdicts:
            big = w[a:b].astype(np.int64) * h[a:b] > max_pixels
            code = np.where((code == 0) & big, VERDICT["oversized"], code).astype(np.uint8)
        if shard is not None:
            code = np.where((code == 0) & (shard[a:b] < 0), VERDICT["bad-shard"], code).astype(np.uint8)
        nz = np.flatnonzero(code)
        pos.append(nz + a)
        codes.append(code[nz])
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(pos, np.int64), cat(codes, np.uint8)


def _unchecked(index: DataIndex, keep: Optional[np.ndarray]) -> int:
    if not index.header.get("verdicts"):
        return index.num_samples if keep is None else len(keep)
    if keep is None and "unchecked" in index.header:
        return int(index.header["unchecked"])
    v = index.verdict
    if keep is None:
        return sum(int(np.count_nonzero(v[a:b] == UNCHECKED)) for a, b in _chunks(len(v)))
    return sum(int(np.count_nonzero(v[keep[a:b]] == UNCHECKED)) for a, b in _chunks(len(keep)))


def keep_positions(n: int, drop: np.ndarray) -> Optional[np.ndarray]:
    """Sorted int32 positions of [0, n) without `drop`; None when nothing is dropped."""
    if not len(drop):
        return None
    mask = np.ones(n, bool)
    mask[drop] = False
    return np.concatenate([np.flatnonzero(mask[a:b]).astype(np.int32) + a for a, b in _chunks(n)] or
                          [np.zeros(0, np.int32)])


def _sample_issue(index: DataIndex, file: str, pos: int, code: int, max_pixels: int) -> Issue:
    o = index.path_offsets
    path = bytes(index.path_blob[o[pos]:o[pos + 1]]).decode(errors="backslashreplace")
    name = VERDICTS[code]
    detail = f"{int(index.width[pos])}x{int(index.height[pos])} > data.max_pixels {max_pixels}" \
        if name == "oversized" else "found by the validator"
    if "shard" in index.arrays:
        s = int(index.shard[pos])
        where = (index.header["shards"][s], int(index.shard_pos[pos])) if s >= 0 else (Path(file).name, 0)
        if s < 0 and name == "bad-shard":
            detail = f"sample id {pos} is in no shard"
        return make_issue(name, where[0], where[1], detail, path)
    return make_issue(name, file, int(index.lines[pos]), detail, path)


def _refuse(what, index, file, parse_errors, bad_pos, bad_codes, max_pixels, cmd, total):
    first = [_sample_issue(index, file, int(p), int(c), max_pixels) for p, c in zip(bad_pos[:8], bad_codes[:8])]
    shown = sorted(parse_errors[:8] + first, key=lambda i: (i.file, i.line))
    return refusal(what, shown, cmd, total)


def _verdicts_apply(index: DataIndex, root: Optional[str], notes: list) -> bool:
    meta = index.header.get("verdicts")
    if not meta:
        return True  # nothing recorded: every verdict is 'unchecked'
    if root is not None and meta.get("root") and Path(meta["root"]) != Path(root).resolve():
        notes.append(f"the verdicts in {index.path} were made for image root {meta['root']}, not {root}: "
                     "every image is checked when read instead")
        return False
    return True


def prepare_list(list_file: str, root: str, *, num_classes: Optional[int], skip_corrupt: bool, skip_list: str = "",
                 max_pixels: int = jpeg.DEFAULT_MAX_PIXELS, index: Optional[IndexOptions] = None) -> Prepared:
    """The usable samples of a list file, from its data index (built here when missing and small)."""
    opt = index or IndexOptions()
    idx = ensure_index("list", list_file, index_path=opt.path or None, num_classes=num_classes,
                       auto_build_max=opt.auto_build_max, wait_s=opt.wait_s, builder=opt.builder, log=opt.log)
    counts = idx.header.get("issue_counts", {})
    if counts.get("empty-list"):
        raise DataError(f"{list_file}: error [empty-list]: the list file holds no samples (0 samples)")
    parse_errors = idx.issues(errors_only=True, limit=8)
    n_parse = sum(v for k, v in counts.items() if make_issue(k, "", 0).is_error)
    notes: list = []
    bad_pos, bad_codes = bad_samples(idx, max_pixels, _verdicts_apply(idx, root, notes))
    cmd = f"hvpmtl data validate --list {list_file} --root {root}"
    skipped = Skipped(parse_errors=n_parse, total=len(idx) + n_parse)
    if skip_list:
        skip = read_skip_list(skip_list)
        name = Path(list_file).name
        all_errors = idx.issues(errors_only=True)
        uncovered = [e for e in all_errors if (name, e.line) not in skip]
        if uncovered:
            raise refusal(f"{list_file} (skip list {skip_list} is stale)", uncovered[:8],
                          f"hvpmtl data validate --list {list_file} --root {root}", len(uncovered))
        listed = np.asarray(sorted(line for (f, line) in skip if f == name), np.int64)
        at = np.minimum(np.searchsorted(idx.lines, listed), max(0, len(idx) - 1))
        hit = (idx.lines[at] == listed) if len(idx) else np.zeros(len(listed), bool)
        drop = at[hit].astype(np.int64)
        for p, line in zip(drop.tolist()[:100000], listed[hit].tolist()):
            want = skip[(name, line)][0]
            o = idx.path_offsets
            have = bytes(idx.path_blob[o[p]:o[p + 1]]).decode(errors="backslashreplace")
            if have != want:
                raise DataError(f"skip list {skip_list} says line {line} of {list_file} is '{want}' but it is "
                                f"'{have}': the skip list belongs to another list file; re-run the validator")
        rest = ~np.isin(bad_pos, drop)
        skipped.skip_list = len(drop)
        if skip_corrupt:
            skipped.skip_corrupt = int(rest.sum())
            drop = np.union1d(drop, bad_pos)
        elif rest.any():  # the skip list is trusted: they stay, and fail when read, naming file:line
            first = _sample_issue(idx, list_file, int(bad_pos[rest][0]), int(bad_codes[rest][0]), max_pixels)
            notes.append(f"{int(rest.sum())} sample(s) with errors recorded in {idx.path} are not in the skip list "
                         f"{skip_list} (first: {first.format()}); they are read, and fail, unless data.skip_corrupt")
    else:
        if (n_parse or len(bad_pos)) and not skip_corrupt:
            raise _refuse(list_file, idx, list_file, parse_errors, bad_pos, bad_codes, max_pixels, cmd,
                          n_parse + len(bad_pos))
        skipped.skip_corrupt = len(bad_pos)
        drop = bad_pos
    keep = keep_positions(len(idx), drop)
    samples = IndexedSamples(idx, keep, source=str(list_file))
    if len(samples) == 0:
        raise DataError(f"{list_file}: no usable samples ({skipped.describe()})")
    return Prepared(samples, skipped, None, _unchecked(idx, keep) if not notes else len(samples), idx, notes)


def prepare_shards(folder: str, *, num_classes: Optional[int], skip_corrupt: bool, skip_list: str = "",
                   max_pixels: int = jpeg.DEFAULT_MAX_PIXELS, index: Optional[IndexOptions] = None) -> Prepared:
    """Shards ready for fn.readers.webdataset: from the shard folder's data index (no tar is read);
    samples left out by filtered copies of the DALI indices, else a DataError naming shard and key."""
    opt = index or IndexOptions()
    ss = load_shard_set(folder)
    if num_classes is not None and ss.manifest.get("num_classes") not in (None, num_classes):
        raise DataError(f"{folder}: shards were written for {ss.manifest['num_classes']} classes, "
                        f"data.num_classes is {num_classes}")
    try:
        idx = ensure_index("shards", folder, index_path=opt.path or None, num_classes=num_classes,
                           auto_build_max=opt.auto_build_max, wait_s=opt.wait_s, builder=opt.builder, log=opt.log)
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError, zipfile.BadZipFile, EOFError) as e:
        # building the index read a damaged manifest, labels.npz or .idx: name the file (shards.diagnose)
        raise diagnose(folder) or DataError(f"{folder}: the shard metadata cannot be indexed ({type(e).__name__}: "
                                            f"{e}); `hvpmtl data validate --shards {folder}` checks every file") \
            from None
    notes: list = []
    shard_issues = idx.issues(errors_only=True)
    bad_pos, bad_codes = bad_samples(idx, max_pixels)
    # samples to-shards left out itself (--skip-corrupt when writing): in no tar, with their error verdict
    written_out = (idx.shard[bad_pos] < 0) & (idx.verdict[bad_pos] >= FIRST_ERROR) if len(bad_pos) else \
        np.zeros(0, bool)
    pre, bad_pos, bad_codes = bad_pos[written_out], bad_pos[~written_out], bad_codes[~written_out]
    cmd = f"hvpmtl data validate --shards {folder}"
    skipped = Skipped(total=len(idx))
    if skip_list:
        skip = read_skip_list(skip_list)
        names = idx.header["shards"]
        by_name = {n: i for i, n in enumerate(names)}
        keys = np.asarray([by_name[f] * 2**32 + p for (f, p) in skip if f in by_name and p > 0], np.int64)
        listed = np.flatnonzero(np.isin(idx.shard.astype(np.int64) * 2**32 + idx.shard_pos, keys)) \
            if len(keys) else np.zeros(0, np.int64)
        # the skip list is trusted: other samples with error verdicts stay (DALI names them if they fail);
        # samples in no tar (an empty or lost shard) cannot stay
        absent = bad_pos[idx.shard[bad_pos] < 0] if len(bad_pos) else bad_pos
        gone = np.union1d(absent, pre)
        skipped.skip_list = len(np.union1d(listed, absent))
        skipped.skip_corrupt = len(pre)
        drop = np.union1d(listed, gone)
        if skip_corrupt:
            skipped.skip_corrupt += int((~np.isin(bad_pos, drop)).sum())
            drop = np.union1d(drop, bad_pos)
    else:
        if (shard_issues or len(bad_pos)) and not skip_corrupt:
            raise _refuse(f"shards in {folder}", idx, folder, shard_issues, bad_pos, bad_codes, max_pixels, cmd,
                          len(shard_issues) + len(bad_pos))
        skipped.skip_corrupt = len(bad_pos) + len(pre)
        drop = np.union1d(bad_pos, pre)
    keep = keep_positions(len(idx), drop)
    tmp = None
    tars, idx_paths = [], []
    # tars with samples left out get a filtered copy of their DALI index (text only; no tar is read)
    present_drop = drop[idx.shard[drop] >= 0] if len(drop) else drop
    by_tar: dict[int, set] = {}
    for p in present_drop.tolist():
        by_tar.setdefault(int(idx.shard[p]), set()).add(int(idx.shard_pos[p]))
    per_tar = idx.header["per_shard"]
    base = str(folder)
    for s, name in enumerate(idx.header["shards"]):
        n_here = int(per_tar[s]) - len(by_tar.get(s, ()))
        if n_here <= 0:
            continue
        i_name = os.path.splitext(name)[0] + ".idx"
        i_path = os.path.join(base, i_name)
        if s in by_tar:
            if tmp is None:
                tmp = tempfile.TemporaryDirectory(prefix="hvpmtl-idx-")
            filtered = os.path.join(tmp.name, i_name)
            filter_index(i_path, filtered, by_tar[s])
            i_path = filtered
        tars.append(os.path.join(base, name))
        idx_paths.append(i_path)
    if not tars:
        if tmp is not None:
            tmp.cleanup()
        raise DataError(f"{folder}: no usable shards ({skipped.describe()})")
    samples = IndexedSamples(idx, keep, source=str(folder))
    return Prepared(samples, skipped, ShardPlan(Path(folder), tars, idx_paths, keep, tmp), 0, idx, notes)


# ----------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def scan_image_folder(root: str | Path) -> tuple[list[str], LabelList, np.ndarray]:
    """(class names, the files as a LabelList without multi-labels, their class indices): classes are
    the sorted sub-folder names (torchvision's ImageFolder order). Lists folders, opens no image."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    paths, targets = [], []
    for c, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                paths.append(os.fsencode(p.relative_to(root)))
                targets.append(c)
    if not paths:
        raise DataError(f"{root}: no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    n = len(paths)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(p) for p in paths], out=offsets[1:])
    labels = LabelList(str(root), b"".join(paths), offsets, np.arange(1, n + 1, dtype=np.int64),
                       np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    return classes, labels, np.asarray(targets, np.int64)


def prepare_imagefolder(root: str | Path) -> tuple[list[str], Prepared, np.ndarray]:
    classes, labels, targets = scan_image_folder(root)
    return classes, Prepared(labels, Skipped(total=len(labels)), None, len(labels)), targets
