"""Data set checks for `hvpmtl data validate` and for the loaders before training starts.

Policy (docs/DATA.md): errors make a sample unusable: missing/unreadable/zero-byte files,
truncated or corrupt JPEGs, non-JPEG content (PNG, GIF, ...), malformed labels, class indices out
of range, confidences outside (0, 1], duplicate paths (the later line), empty shards. Grayscale and
CMYK JPEGs are warnings: DALI decodes them to RGB (a grayscale channel is repeated; CMYK/YCCK go
through the decoder's colour conversion). Empty lines and images without labels are warnings.

The loaders refuse a data set with errors unless given the validator's skip list
(`data.skip_list`, trusted: no image scan) or `data.skip_corrupt: true` (header scan at start-up,
bad samples left out and counted).
"""
from __future__ import annotations

import json
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from hvpmtl.data import jpeg
from hvpmtl.data.issues import DataError, Issue, make_issue
from hvpmtl.data.shards import ShardSet, load_shard_set, read_index, split_name, write_index_lines
from hvpmtl.data.tencent import LabelList, read_dictionary, read_list_file

SKIP_HEADER = "# hvpmtl skip list: file<TAB>line<TAB>path-or-key<TAB>code"
SHOW = 8  # errors listed in a refusal


@dataclass
class Report:
    issues: list[Issue] = field(default_factory=list)
    num_samples: int = 0  # samples checked

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.is_error]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if not i.is_error]

    def counts(self) -> Counter:
        return Counter(i.code for i in self.issues)


# ----------------------------------------------------------------------------- image scans


def _chunks(n: int, size: int = 8192) -> Iterable[range]:
    for s in range(0, n, size):
        yield range(s, min(n, s + size))


def scan_list_images(labels: LabelList, root: str, *, full_decode: bool = False, workers: int = 16) -> list[Issue]:
    """Header checks (or full decodes) of every image; one issue per bad or unusual image."""
    issues = []
    rootp = Path(root)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for rng in _chunks(len(labels)):
            paths = [labels.path(i) for i in rng]
            results = pool.map(lambda p: jpeg.check_file(str(rootp / p), full_decode), paths)
            for i, p, (code, detail) in zip(rng, paths, results):
                if code:
                    issues.append(make_issue(code, labels.source, int(labels.lines[i]), detail, p))
    return issues


# ----------------------------------------------------------------------------- list files


def validate_list(list_file: str, root: str, *, dictionary: Optional[str] = None, num_classes: Optional[int] = None,
                  full_decode: bool = False, workers: int = 16) -> Report:
    rep = Report()
    if dictionary:
        try:
            d = read_dictionary(dictionary)
            if num_classes is not None and num_classes != len(d):
                rep.issues.append(make_issue("class-count", dictionary, 0,
                                             f"--num-classes {num_classes} but the dictionary has {len(d)} classes"))
            num_classes = len(d) if num_classes is None else num_classes
        except DataError as e:
            rep.issues.append(Issue("bad-dictionary", dictionary, 0, str(e)))
    labels, parse_issues = read_list_file(list_file, num_classes)
    rep.issues += parse_issues
    rep.issues += scan_list_images(labels, root, full_decode=full_decode, workers=workers)
    rep.num_samples = len(labels)
    rep.issues.sort(key=lambda i: (i.file, i.line))
    return rep


# ----------------------------------------------------------------------------- skip lists


def write_skip_list(path: str, issues: Iterable[Issue]) -> int:
    n = 0
    with open(path, "w") as f:
        f.write(SKIP_HEADER + "\n")
        for i in issues:
            if i.is_error and i.line:
                f.write(f"{i.file}\t{i.line}\t{i.path}\t{i.code}\n")
                n += 1
    return n


def read_skip_list(path: str) -> dict[int, tuple[str, str]]:
    """line (or shard sample position) -> (path or key, code); keys carry 'shard.tar:' for shards."""
    out: dict = {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise DataError(f"cannot read skip list {path}: {e.strerror}") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        t = line.split("\t")
        if len(t) != 4 or not t[1].isdigit():
            raise DataError(f"{path}:{n}: expected 'file<TAB>line<TAB>path<TAB>code' as written by "
                            "`hvpmtl data validate --skip-list`")
        out[(Path(t[0]).name, int(t[1]))] = (t[2], t[3])
    return out


def _refusal(what: str, errors: list[Issue], validate_cmd: str) -> DataError:
    shown = "\n".join("  " + e.format() for e in errors[:SHOW])
    more = f"\n  ... and {len(errors) - SHOW} more" if len(errors) > SHOW else ""
    return DataError(
        f"{what}: {len(errors)} sample(s) cannot be used:\n{shown}{more}\n"
        f"Fix the files, or run `{validate_cmd} --skip-list skip.txt` and train with "
        "`--set data.skip_list=skip.txt`, or set `data.skip_corrupt: true` to leave bad samples out "
        "(they are counted in skipped_corrupt).")


def prepare_list(list_file: str, root: str, *, num_classes: Optional[int], skip_corrupt: bool,
                 skip_list: str = "", workers: int = 16) -> tuple[LabelList, int]:
    """The usable samples of a list file, and how many bad ones were left out.

    Raises DataError listing file:line of the first errors when the data set has errors that
    neither the skip list covers nor skip_corrupt allows to drop.
    """
    labels, issues = read_list_file(list_file, num_classes)
    parse_errors = [i for i in issues if i.is_error]
    cmd = f"hvpmtl data validate --list {list_file} --root {root}"
    if skip_list:
        skip = read_skip_list(skip_list)
        name = Path(list_file).name
        uncovered = [e for e in parse_errors if (name, e.line) not in skip]
        if uncovered:
            raise _refusal(f"{list_file} (skip list {skip_list} is stale)", uncovered, cmd)
        line_to_pos = {int(n): i for i, n in enumerate(labels.lines)}
        drop = []
        for (fname, line), (p, _) in skip.items():
            if fname != name or line not in line_to_pos:
                continue
            i = line_to_pos[line]
            if labels.path(i) != p:
                raise DataError(f"skip list {skip_list} says line {line} of {list_file} is '{p}' but it is "
                                f"'{labels.path(i)}': the skip list belongs to another list file; re-run the validator")
            drop.append(i)
        keep = np.setdiff1d(np.arange(len(labels)), np.asarray(drop, np.int64))
        return (labels.subset(keep) if drop else labels), len(parse_errors) + len(drop)
    image_issues = scan_list_images(labels, root, workers=workers)
    errors = parse_errors + [i for i in image_issues if i.is_error]
    if errors and not skip_corrupt:
        errors.sort(key=lambda i: i.line)
        raise _refusal(list_file, errors, cmd)
    bad_lines = {i.line for i in image_issues if i.is_error}
    if not bad_lines:
        return labels, len(parse_errors)
    keep = np.asarray([i for i, n in enumerate(labels.lines) if int(n) not in bad_lines], np.int64)
    return labels.subset(keep), len(parse_errors) + len(bad_lines)


# ----------------------------------------------------------------------------- shards


def _tar_samples(tar_path: Path) -> list[list[tuple[str, int, int, str]]]:
    """The tar's samples as index entries, from the tar itself."""
    samples, last = [], None
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isreg():
                continue
            key, ext = split_name(m.name)
            if key != last:
                samples.append([])
                last = key
            samples[-1].append((ext, m.offset_data, m.size, m.name))
    return samples


def _check_shard_samples(tar_path: Path, samples, table: Optional[LabelList], num_classes: Optional[int],
                         full_decode: bool, check_json: bool) -> list[Issue]:
    issues = []
    name = tar_path.name
    seen: set = set()
    with open(tar_path, "rb") as f:
        def read(off: int, size: int) -> bytes:
            f.seek(off)
            return f.read(size)
        for pos, comps in enumerate(samples, start=1):
            key = split_name(comps[0][3])[0]
            by_ext = {e: (o, s) for e, o, s, _ in comps}
            if key in seen:
                issues.append(make_issue("duplicate-path", name, pos, "key repeated in the shard", key))
                continue
            seen.add(key)
            missing = [e for e in ("jpg", "id") if e not in by_ext]
            if missing:
                issues.append(make_issue("bad-shard", name, pos, f"no .{' .'.join(missing)} member", key))
                continue
            code, detail = jpeg.check_bytes(read(*by_ext["jpg"]), full_decode)
            if code:
                issues.append(make_issue(code, name, pos, detail, key))
            raw_id = read(*by_ext["id"])
            sid = int(np.frombuffer(raw_id, "<i8")[0]) if len(raw_id) == 8 else -1
            if table is not None and not 0 <= sid < len(table):
                issues.append(make_issue("bad-shard", name, pos, f"sample id {sid} not in the label table", key))
                continue
            if check_json and "json" in by_ext:
                try:
                    meta = json.loads(read(*by_ext["json"]))
                    for k, c in meta["labels"]:
                        if num_classes is not None and not 0 <= k < num_classes:
                            issues.append(make_issue("bad-index", name, pos, f"class index {k}", key))
                        if not 0 < c <= 1:
                            issues.append(make_issue("bad-conf", name, pos, f"confidence {c}", key))
                    if meta["id"] != sid:
                        issues.append(make_issue("bad-shard", name, pos, f".json id {meta['id']} != .id {sid}", key))
                except (ValueError, KeyError, TypeError) as e:
                    issues.append(make_issue("malformed", name, pos, f".json member: {e}", key))
    return issues


def validate_shards(folder: str, *, num_classes: Optional[int] = None, full_decode: bool = False) -> Report:
    rep = Report()
    folder_p = Path(folder)
    try:
        ss = load_shard_set(folder_p)
    except DataError as e:
        rep.issues.append(Issue("bad-shard", str(folder_p), 0, str(e)))
        return rep
    num_classes = num_classes or ss.manifest.get("num_classes")
    listed = {s["name"] for s in ss.manifest["shards"]}
    for extra in sorted(p.name for p in folder_p.glob("*.tar") if p.name not in listed):
        rep.issues.append(make_issue("bad-shard", extra, 0, "tar not listed in manifest.json"))
    for tar_path in ss.tars:
        if not tar_path.exists():
            rep.issues.append(make_issue("bad-shard", tar_path.name, 0, "listed in manifest.json but missing"))
            continue
        try:
            samples = _tar_samples(tar_path)
        except (tarfile.TarError, OSError) as e:
            rep.issues.append(make_issue("bad-shard", tar_path.name, 0, f"not a readable tar: {e}"))
            continue
        idx = tar_path.with_suffix(".idx")
        if not idx.exists():
            rep.issues.append(make_issue("missing-index", tar_path.name, 0, f"{idx.name} not found"))
        else:
            try:
                if read_index(idx) != samples:
                    rep.issues.append(make_issue("bad-shard", idx.name, 0, "index does not match the tar (stale); "
                                                 "rewrite it with `hvpmtl data index-shards`"))
            except DataError as e:
                rep.issues.append(make_issue("bad-shard", idx.name, 0, str(e)))
        if not samples:
            rep.issues.append(make_issue("empty-shard", tar_path.name, 0, "0 samples"))
            continue
        rep.issues += _check_shard_samples(tar_path, samples, ss.labels, num_classes, full_decode, True)
        rep.num_samples += len(samples)
    return rep


@dataclass
class PreparedShards:
    shards: ShardSet
    tars: list[str]
    index_paths: list[str]
    labels: LabelList  # dense: position = loader sample id
    remap: np.ndarray  # stored id -> dense id (-1: skipped)
    skipped: int
    tmpdir: Optional[tempfile.TemporaryDirectory] = None  # holds filtered indices; alive with the loader


def _sample_ids(tar_path: Path, samples) -> np.ndarray:
    """The int64 `.id` member of each sample, read from the tar (-1 where there is none)."""
    out = np.full(len(samples), -1, np.int64)
    with open(tar_path, "rb") as f:
        for j, comps in enumerate(samples):
            for e, o, n, _ in comps:
                if e == "id" and n == 8:
                    f.seek(o)
                    out[j] = int(np.frombuffer(f.read(8), "<i8")[0])
    return out


def prepare_shards(folder: str, *, num_classes: Optional[int], skip_corrupt: bool, skip_list: str = "") -> PreparedShards:
    """Shards ready for fn.readers.webdataset: empty shards dropped and bad samples filtered out of
    (copies of) the DALI indices when allowed, else a DataError naming shard and key.

    Sample ids come from the writer's record of each shard's ids (labels.npz `order`) while a
    shard's sample count matches the manifest, else from the tar's `.id` members.
    """
    ss = load_shard_set(folder)
    if num_classes is not None and ss.manifest.get("num_classes") not in (None, num_classes):
        raise DataError(f"{folder}: shards were written for {ss.manifest['num_classes']} classes, "
                        f"data.num_classes is {num_classes}")
    skip = read_skip_list(skip_list) if skip_list else None
    tmp = tempfile.TemporaryDirectory(prefix="hvpmtl-idx-")
    tars, idx_paths, errors, present, dropped = [], [], [], [], 0
    first = 0
    for tar_path, entry in zip(ss.tars, ss.manifest["shards"]):
        written = ss.order[first:first + entry["samples"]] if ss.order is not None else None
        first += entry["samples"]
        if not tar_path.exists():  # its ids are unknown: cannot be skipped
            raise DataError(f"{tar_path}: listed in {folder}/manifest.json but missing; restore it or rewrite "
                            "the shards")
        idx = tar_path.with_suffix(".idx")
        samples = read_index(idx) if idx.exists() else _tar_samples(tar_path)
        end = max((o + n for comps in samples for _, o, n, _ in comps), default=0)
        if end > tar_path.stat().st_size:  # cheap staleness check: the index points past the tar
            raise DataError(f"{idx}: the index points past the end of {tar_path.name} (stale); rewrite it with "
                            f"`hvpmtl data index-shards {folder}`")
        if not samples:
            errors.append(make_issue("empty-shard", tar_path.name, 0, "0 samples"))
            continue
        if skip is not None:
            bad = {pos for (f, pos) in skip if f == tar_path.name}
        else:
            sample_issues = [i for i in _check_shard_samples(tar_path, samples, ss.labels, num_classes, False, False)
                             if i.is_error]
            bad = {i.line for i in sample_issues}
            errors += sample_issues
        ids = written if written is not None and len(written) == len(samples) else _sample_ids(tar_path, samples)
        keep = [pos - 1 for pos in range(1, len(samples) + 1) if pos not in bad]
        dropped += len(samples) - len(keep)
        present.append(ids[keep])
        if not keep:
            continue
        if bad or not idx.exists():
            idx = Path(tmp.name) / idx.name
            write_index_lines(idx, [samples[j] for j in keep])
        tars.append(str(tar_path))
        idx_paths.append(str(idx))
    if errors and skip is None and not skip_corrupt:
        tmp.cleanup()
        raise _refusal(f"shards in {folder}", errors, f"hvpmtl data validate --shards {folder}")
    if not tars:
        tmp.cleanup()
        raise DataError(f"{folder}: no usable shards")
    n = len(ss.labels)
    keep_ids = np.unique(np.concatenate(present))
    if keep_ids[0] < 0 or keep_ids[-1] >= n:
        raise DataError(f"{folder}: sample ids outside the label table [0, {n}); rewrite the shards")
    remap = np.full(n, -1, np.int64)
    remap[keep_ids] = np.arange(len(keep_ids))
    labels = ss.labels.subset(keep_ids) if len(keep_ids) < n else ss.labels
    return PreparedShards(ss, tars, idx_paths, labels, remap, dropped, tmp)


def format_report(rep: Report, max_per_code: int = 20) -> str:
    lines, shown = [], Counter()
    for i in rep.issues:
        shown[i.code] += 1
        if shown[i.code] <= max_per_code:
            lines.append(i.format())
    for code, n in sorted(rep.counts().items()):
        if n > max_per_code:
            lines.append(f"... {n - max_per_code} more [{code}]")
    c = rep.counts()
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "no issues"
    lines.append(f"{rep.num_samples} samples checked; {len(rep.errors)} errors, {len(rep.warnings)} warnings ({summary})")
    return "\n".join(lines)
