"""`hvpmtl data validate`: find every problem in a data set, report it with file:line, and record
the verdicts in the data index (the loaders read them there: start-up opens no image).

Policy (docs/DATA.md): errors make a sample unusable: missing/unreadable/zero-byte files,
truncated or corrupt JPEGs, non-JPEG content (PNG, GIF, ...), more pixels than max_pixels,
malformed labels, class indices out of range, confidences outside (0, 1], duplicate paths (the
later line), paths that are absolute or climb out of the root, empty shards, an empty list.
Grayscale and CMYK JPEGs are warnings: DALI decodes them to RGB. Empty lines, images without labels
and non-UTF-8 names are warnings.

Scale: the image checks run in processes over all cores (one JPEG header check is a few small reads
and is GIL-bound in threads), in chunks of CHUNK samples (a tar for shards). Each chunk's results go
to a work file beside the index, keyed by each file's size and mtime: a killed run resumes where it
stopped, a re-run re-checks only the files that changed, and `--part i/N` (a Slurm array) checks a
share of the chunks on each machine; `--merge` (or a run without --part) writes the verdicts into
the index and reports.
"""
from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from hvpmtl.data.formats import jpeg
from hvpmtl.data.formats.dictionary import read_dictionary
from hvpmtl.data.formats.index_build import build_shard_index, with_verdicts
from hvpmtl.data.formats.index_file import DataIndex
from hvpmtl.data.formats.index_format import USABLE, VERDICT, VERDICTS, default_index_path
from hvpmtl.data.formats.index_fresh import ensure_index
from hvpmtl.data.formats.issues import DataError, Issue, Report, format_report, make_issue  # noqa: F401 (re-exported)
from hvpmtl.data.formats.list_parse import no_label_issues
from hvpmtl.data.formats.shards import load_shard_set, read_index, readable_samples, sample_key
from hvpmtl.data.loaders.prepare import SKIP_HEADER, read_skip_list  # noqa: F401 (re-exported)
from hvpmtl.data.loaders.root_guard import RootGuard
from hvpmtl.data.tools.jobs import Progress, default_workers, load_npz, part_units, process_pool, save_npz_atomic

CHUNK = 8192  # samples per work unit of a list file, at most (fewer for small lists, so all cores get work)


def chunk_size(n: int) -> int:
    """Work unit size: a function of the list's length alone, so parts and re-runs cut the same units."""
    return max(min(64, CHUNK), min(CHUNK, -(-n // 256)))
NEVER = 2**62  # auto-build limit for the offline commands: they always may build the index


def _work_dir(index_path: Path) -> Path:
    return index_path.with_name(index_path.name + ".work")


# ----------------------------------------------------------------------------- list files: one chunk


def check_list_chunk(index_path: str, root: str, lo: int, hi: int, full_decode: bool, max_pixels: int,
                     work_file: str, key: str, allow_outside_root: bool = False) -> tuple[int, int, int]:
    """Check samples [lo, hi) of an index (in a worker process); results to `work_file`, reusing a
    previous one's verdicts for files whose size and mtime did not change. Returns (lo, hi, re-checked).
    A path that resolves outside the root (through a symlink) is a `bad-path` error, as a textual
    escape is, unless `allow_outside_root`."""
    idx = DataIndex(index_path)
    prev = load_npz(Path(work_file))
    if prev is not None and (str(prev["key"]) != key or int(prev["lo"]) != lo or int(prev["hi"]) != hi):
        prev = None
    n = hi - lo
    verdict, width, height = np.zeros(n, np.uint8), np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    size, mtime = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    full = np.zeros(n, bool)
    details = [b""] * n
    rootp = os.fsencode(root)
    guard = None if allow_outside_root else RootGuard(rootp)
    o, blob = idx.path_offsets, idx.path_blob
    redone = 0
    for j in range(n):
        p = os.path.join(rootp, bytes(blob[o[lo + j]:o[lo + j + 1]]))
        real = guard.outside(p) if guard is not None else b""
        if real:
            verdict[j] = VERDICT["bad-path"]
            details[j] = b"resolves to " + real + b", outside the image root (a symlink); such files are never " \
                b"opened (data.allow_outside_root: true and validate --allow-outside-root accept them)"
            redone += 1
            continue
        try:
            st = os.stat(p)
            size[j], mtime[j] = st.st_size, st.st_mtime_ns
        except OSError:
            pass
        if prev is not None and size[j] >= 0 and prev["size"][j] == size[j] and prev["mtime"][j] == mtime[j] and \
                (prev["full"][j] or not full_decode):
            verdict[j], width[j], height[j], full[j] = prev["verdict"][j], prev["width"][j], prev["height"][j], \
                prev["full"][j]
            details[j] = bytes(prev["detail_blob"][prev["detail_off"][j]:prev["detail_off"][j + 1]])
            continue
        c = jpeg.check_file(p, full_decode=False, max_pixels=0)
        if full_decode and c.usable:
            if max_pixels and c.width * c.height > max_pixels:  # never decode a bomb to find out more
                c = jpeg.Check("oversized", jpeg.too_big(c.width, c.height, max_pixels) + ": not decoded",
                               c.width, c.height)
            else:
                c = jpeg.check_file(p, full_decode=True, max_pixels=0)
        verdict[j] = VERDICT[c.code] if c.code else VERDICT["ok"]
        width[j], height[j], full[j] = min(c.width, 65535), min(c.height, 65535), full_decode
        details[j] = c.detail.encode(errors="surrogateescape")
        redone += 1
    off = np.zeros(n + 1, np.int64)
    np.cumsum([len(d) for d in details], out=off[1:])
    save_npz_atomic(Path(work_file), key=np.array(key), lo=np.array(lo), hi=np.array(hi), verdict=verdict,
                    width=width, height=height, size=size, mtime=mtime, full=full, detail_off=off,
                    detail_blob=np.frombuffer(b"".join(details), np.uint8))
    idx.close()
    return lo, hi, redone


def _chunk_file(work: Path, lo: int, hi: int) -> Path:
    return work / f"list-{lo:012d}-{hi:012d}.npz"


SMALL = 4096  # less work than this runs inline: starting processes would cost more


def _run(jobs: list, fn, workers: int, progress: Progress, unit_size, total: int) -> None:
    """Run work units in processes (inline with one worker or little work), in order of submission."""
    if workers <= 1 or len(jobs) <= 1 or total < SMALL:
        for args in jobs:
            fn(*args)
            progress.add(unit_size(args))
        return
    with process_pool(min(workers, len(jobs))) as pool:
        futures = [(pool.submit(fn, *args), args) for args in jobs]
        for f, args in futures:
            f.result()
            progress.add(unit_size(args))


def validate_list(list_file: str, root: str, *, dictionary: Optional[str] = None, num_classes: Optional[int] = None,
                  full_decode: bool = False, workers: Optional[int] = None, max_pixels: int = jpeg.DEFAULT_MAX_PIXELS,
                  index_path: Optional[str] = None, part: Optional[tuple[int, int]] = None, merge_only: bool = False,
                  progress: bool = False, allow_outside_root: bool = False) -> Report:
    """Check a list file and its images (first the data index itself: a damaged one, by its checksum,
    is rebuilt). Without `part`: every chunk (re-using verdicts of unchanged
    files), then the verdicts go into the index. With `part`: that share of the chunks only.
    `merge_only` (after all parts): checks nothing, assembles the work files into the index."""
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
    idx = ensure_index("list", list_file, index_path=index_path, num_classes=num_classes, auto_build_max=NEVER,
                       log=lambda m: print(m, flush=True) if progress else None, verify=True)
    n = len(idx)
    work = _work_dir(idx.path)
    work.mkdir(exist_ok=True)
    key = json.dumps([idx.header["key"]["sha256"], num_classes, str(Path(root).resolve())] +
                     (["allow_outside_root"] if allow_outside_root else []))
    size = chunk_size(n)
    chunks = [(lo, min(n, lo + size)) for lo in range(0, n, size)]
    mine = [chunks[c] for c in part_units(len(chunks), part)]
    if not merge_only:
        todo = [(str(idx.path), str(root), lo, hi, full_decode, max_pixels, str(_chunk_file(work, lo, hi)), key,
                 allow_outside_root)
                for lo, hi in (mine if part is not None else chunks)]
        prog = Progress(f"validate {Path(list_file).name}" + (f" part {part[0]}/{part[1]}" if part else ""),
                        sum(hi - lo for _, _, lo, hi, *_ in todo), enabled=progress)
        _run(todo, check_list_chunk, workers or default_workers(), prog, lambda a: a[3] - a[2], prog.total)
        prog.close()
    use = mine if part is not None else chunks
    results = [load_npz(_chunk_file(work, lo, hi)) for lo, hi in use]
    missing = [c for c, r in zip(use, results) if r is None or str(r["key"]) != key]
    if missing:
        raise DataError(f"{len(missing)} of {len(use)} chunks of {list_file} are not checked yet (first: samples "
                        f"{missing[0][0]}-{missing[0][1]}); run the missing parts (`hvpmtl data validate --part i/N`) "
                        "before --merge")
    verdict = np.concatenate([r["verdict"] for r in results]) if results else np.zeros(0, np.uint8)
    width = np.concatenate([r["width"] for r in results]) if results else np.zeros(0, np.uint16)
    height = np.concatenate([r["height"] for r in results]) if results else np.zeros(0, np.uint16)
    first = use[0][0] if use else 0
    rep.issues += [i for i in idx.issues() if part is None or i.line == 0]
    rep.issues += _image_issues(idx, list_file, first, verdict, width, height, results, max_pixels)
    rep.issues += _no_label_issues(idx, list_file, first, first + len(verdict))
    rep.num_samples = len(verdict)
    rep.issues.sort(key=lambda i: (i.file, i.line))
    if part is None:
        full = bool(results) and all(r["full"].all() for r in results)
        with_verdicts(idx, verdict, width, height, {"by": "validate", "root": str(Path(root).resolve()),
                                                     "full_decode": full, "max_pixels": max_pixels})
    idx.close()
    return rep


def _image_issues(idx: DataIndex, file: str, first: int, verdict, width, height, results, max_pixels) -> list[Issue]:
    out = []
    detail_of = {}
    base = first
    for r in results:
        lo = int(r["lo"])
        for j in np.flatnonzero(r["verdict"] > VERDICT["ok"]):
            detail_of[lo + int(j)] = bytes(r["detail_blob"][r["detail_off"][j]:r["detail_off"][j + 1]]).decode(
                errors="backslashreplace")
    big = (width.astype(np.int64) * height > max_pixels) if max_pixels else np.zeros(len(verdict), bool)
    o, blob = idx.path_offsets, idx.path_blob
    for j in np.flatnonzero((verdict > VERDICT["ok"]) | (big & np.isin(verdict, USABLE))).tolist():
        p = base + j
        path = bytes(blob[o[p]:o[p + 1]]).decode(errors="backslashreplace")
        if verdict[j] > VERDICT["ok"]:
            out.append(make_issue(VERDICTS[verdict[j]], file, int(idx.lines[p]), detail_of.get(p, ""), path))
        if big[j] and verdict[j] in USABLE:
            out.append(make_issue("oversized", file, int(idx.lines[p]),
                                  jpeg.too_big(int(width[j]), int(height[j]), max_pixels), path))
    return out


def _no_label_issues(idx: DataIndex, file: str, lo: int, hi: int) -> list[Issue]:
    counts = np.diff(idx.indptr[lo:hi + 1].astype(np.int64))
    o, blob = idx.path_offsets, idx.path_blob
    return no_label_issues(file, lo + np.flatnonzero(counts == 0), idx.lines, lambda p: bytes(blob[o[p]:o[p + 1]]))


# ----------------------------------------------------------------------------- shards: one tar


def check_tar(folder: str, name: str, full_decode: bool, max_pixels: int, num_ids: int, num_classes: Optional[int],
              work_file: str, bucket: str = "") -> None:
    """Check one shard (in a worker process): the tar against its DALI index, every sample's members,
    image and label record. Results to `work_file`, reused while the tar and its index keep their
    size and mtime. `bucket` (issue 22): `folder` is the local view of s3://bucket/prefix (loaders/shard_cache.py)
    and the tar is downloaded to a temporary file to be checked."""
    if bucket:
        with tempfile.TemporaryDirectory(prefix=".check-", dir=Path(work_file).parent) as tmp:
            return _check_bucket_tar(folder, name, full_decode, max_pixels, num_ids, num_classes, work_file, bucket,
                                     Path(tmp))
    tar_path = Path(folder) / name
    idx_path = tar_path.with_suffix(".idx")
    stamp = []
    for p in (tar_path, idx_path):
        try:
            st = p.stat()
            stamp += [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp += [-1, -1]
    stamp = np.asarray(stamp + [int(full_decode), max_pixels], np.int64)
    prev = load_npz(Path(work_file))
    if prev is not None and np.array_equal(prev["stamp"][:4], stamp[:4]) and \
            (prev["stamp"][4] >= stamp[4]) and prev["stamp"][5] == stamp[5]:
        return
    _check_tar_file(tar_path, idx_path, folder, name, stamp, full_decode, max_pixels, num_ids, num_classes, work_file)


def _check_bucket_tar(folder, name, full_decode, max_pixels, num_ids, num_classes, work_file, bucket, tmp: Path):
    from hvpmtl.data.formats.object_store import ObjectStore
    store, uri = ObjectStore.for_uri(bucket)
    view = Path(folder) / name
    idx_path = view.with_suffix(".idx")
    st, si = view.stat(), idx_path.stat()  # the view's placeholder: the object's size and Last-Modified
    stamp = np.asarray([st.st_size, st.st_mtime_ns, si.st_size, si.st_mtime_ns, int(full_decode), max_pixels], np.int64)
    prev = load_npz(Path(work_file))
    if prev is not None and np.array_equal(prev["stamp"][:4], stamp[:4]) and \
            (prev["stamp"][4] >= stamp[4]) and prev["stamp"][5] == stamp[5]:
        return
    local = tmp / name
    try:
        store.download(uri.child(name).key, local, expect_size=st.st_size)
    except DataError as e:
        save_npz_atomic(Path(work_file), stamp=stamp, ids=np.zeros(0, np.int64), verdict=np.zeros(0, np.uint8),
                        width=np.zeros(0, np.uint16), height=np.zeros(0, np.uint16),
                        issues=np.array(json.dumps([["bad-shard", name, 0, str(e), ""]])))
        return
    _check_tar_file(local, idx_path, bucket, name, stamp, full_decode, max_pixels, num_ids, num_classes, work_file)


def _check_tar_file(tar_path: Path, idx_path: Path, folder: str, name: str, stamp, full_decode, max_pixels, num_ids,
                    num_classes, work_file) -> None:
    issues: list[Issue] = []
    ids, verdict, width, height = [], [], [], []
    if stamp[0] < 0:
        issues.append(make_issue("bad-shard", name, 0, "listed in manifest.json but missing"))
    else:
        try:
            samples, damage = readable_samples(tar_path)
        except OSError as e:
            samples, damage = None, f"not a readable tar: {e.strerror or e}"
        if damage:  # the samples after the damage are lost: reported by id in validate_shards
            issues.append(make_issue("bad-shard", name, 0, f"{damage}; {len(samples or [])} complete samples before it"))
        if samples is not None:
            if stamp[2] < 0:  # training cannot read the shard without it: an error, as at training start
                issues.append(make_issue("bad-shard", idx_path.name, 0, f"no DALI index beside {name}; write it with "
                                         f"`hvpmtl data index-shards {folder}`"))
            else:
                try:
                    if read_index(idx_path) != samples:
                        issues.append(make_issue("bad-shard", idx_path.name, 0, "index does not match the tar (stale); "
                                                 f"rewrite it with `hvpmtl data index-shards {folder}`"))
                except DataError as e:
                    issues.append(make_issue("bad-shard", idx_path.name, 0, str(e)))
            if not samples:
                issues.append(make_issue("empty-shard", name, 0, "0 samples"))
            _check_samples(tar_path, samples, num_ids, num_classes, full_decode, max_pixels, issues, ids, verdict,
                           width, height)
    save_npz_atomic(Path(work_file), stamp=stamp, ids=np.asarray(ids, np.int64), verdict=np.asarray(verdict, np.uint8),
                    width=np.asarray(width, np.uint16), height=np.asarray(height, np.uint16),
                    issues=np.array(json.dumps([[i.code, i.file, i.line, i.message, i.path] for i in issues])))


def _check_samples(tar_path: Path, samples, num_ids, num_classes, full_decode, max_pixels, issues, ids, verdict,
                   width, height) -> None:
    name = tar_path.name
    seen: set = set()
    with open(tar_path, "rb") as f:
        def read(off: int, size: int) -> bytes:
            f.seek(off)
            return f.read(size)
        for pos, comps in enumerate(samples, start=1):
            key = sample_key(comps)
            by_ext = {e: (o, s) for e, o, s, _ in comps}
            if key in seen:
                issues.append(make_issue("duplicate-path", name, pos, "key repeated in the shard", key))
                continue
            seen.add(key)
            missing = [e for e in ("jpg", "id") if e not in by_ext]
            if missing:
                issues.append(make_issue("bad-shard", name, pos, f"no .{' .'.join(missing)} member", key))
                continue
            raw_id = read(*by_ext["id"])
            sid = int(np.frombuffer(raw_id, "<i8")[0]) if len(raw_id) == 8 else -1
            if not 0 <= sid < num_ids:
                issues.append(make_issue("bad-shard", name, pos, f"sample id {sid} not in the label table", key))
                continue
            data = read(*by_ext["jpg"])
            c = jpeg.check_bytes(data, False, 0)
            if full_decode and c.usable:
                if max_pixels and c.width * c.height > max_pixels:
                    c = jpeg.Check("oversized", jpeg.too_big(c.width, c.height, max_pixels) + ": not decoded",
                                   c.width, c.height)
                else:
                    c = jpeg.check_bytes(data, True, 0)
            if c.code:
                issues.append(make_issue(c.code, name, pos, c.detail, key))
            if max_pixels and c.usable and c.width * c.height > max_pixels:
                issues.append(make_issue("oversized", name, pos, jpeg.too_big(c.width, c.height, max_pixels), key))
            ids.append(sid)
            verdict.append(VERDICT[c.code] if c.code else VERDICT["ok"])
            width.append(min(c.width, 65535))
            height.append(min(c.height, 65535))
            if "json" in by_ext:
                try:
                    meta = json.loads(read(*by_ext["json"]))
                    for k, conf in meta["labels"]:
                        if num_classes is not None and not 0 <= k < num_classes:
                            issues.append(make_issue("bad-index", name, pos, f"class index {k}", key))
                        if not 0 < conf <= 1:
                            issues.append(make_issue("bad-conf", name, pos, f"confidence {conf}", key))
                    if meta["id"] != sid:
                        issues.append(make_issue("bad-shard", name, pos, f".json id {meta['id']} != .id {sid}", key))
                except (ValueError, KeyError, TypeError) as e:
                    issues.append(make_issue("malformed", name, pos, f".json member: {e}", key))


def validate_shards(folder: str, *, num_classes: Optional[int] = None, full_decode: bool = False,
                    workers: Optional[int] = None, max_pixels: int = jpeg.DEFAULT_MAX_PIXELS,
                    index_path: Optional[str] = None, part: Optional[tuple[int, int]] = None, merge_only: bool = False,
                    progress: bool = False, bucket: str = "") -> Report:
    """Check a shard folder, a tar per work unit; without `part`, the verdicts go into the shard
    folder's data index (rebuilt from the current tars' DALI indices). `bucket`: see check_tar."""
    rep = Report()
    folder_p = Path(folder)
    try:
        ss = load_shard_set(folder_p)
        num_ids = len(ss.record()["lines"])
    except DataError as e:
        rep.issues.append(Issue("bad-shard", str(folder_p), 0, str(e)))
        return rep
    num_classes = num_classes or ss.manifest.get("num_classes")
    out = Path(index_path) if index_path else default_index_path(folder_p)
    work = _work_dir(out)
    work.mkdir(exist_ok=True)
    names = [s["name"] for s in ss.manifest["shards"]]
    mine = [names[u] for u in part_units(len(names), part)]
    if not merge_only:
        todo = [(str(folder_p), nm, full_decode, max_pixels, num_ids, num_classes, str(work / f"{nm}.npz"), bucket)
                for nm in (mine if part is not None else names)]
        prog = Progress(f"validate {folder_p.name}" + (f" part {part[0]}/{part[1]}" if part else ""), len(todo),
                        unit="shards", enabled=progress)
        _run(todo, check_tar, workers or default_workers(), prog, lambda a: 1, num_ids)
        prog.close()
    use = mine if part is not None else names
    results = [load_npz(work / f"{nm}.npz") for nm in use]
    missing = [nm for nm, r in zip(use, results) if r is None]
    if missing:
        raise DataError(f"{len(missing)} of {len(use)} shards of {folder} are not checked yet (first: {missing[0]}); "
                        "run the missing parts (`hvpmtl data validate --shards ... --part i/N`) before --merge")
    listed = set(names)
    if part is None:
        for extra in sorted(p.name for p in folder_p.glob("*.tar") if p.name not in listed):
            rep.issues.append(make_issue("bad-shard", extra, 0, "tar not listed in manifest.json"))
    verdict, width, height = np.zeros(num_ids, np.uint8), np.zeros(num_ids, np.uint16), np.zeros(num_ids, np.uint16)
    structural = False
    verdict_seen = np.zeros(num_ids, bool)
    for r in results:
        for code, file, line, message, path in json.loads(str(r["issues"])):
            rep.issues.append(Issue(code, file, line, message, path))
            structural |= code in ("bad-shard", "missing-index") and line == 0
        verdict[r["ids"]], width[r["ids"]], height[r["ids"]] = r["verdict"], r["width"], r["height"]
        verdict_seen[r["ids"]] = True
        rep.num_samples += len(r["ids"])
    if part is None:
        rep.issues += _lost_samples(ss, verdict_seen)
    rep.issues.sort(key=lambda i: (i.file, i.line))
    if part is None and not structural:
        build_shard_index(folder_p, out, verdicts=(verdict, width, height),
                          verdict_meta={"by": "validate", "full_decode": full_decode, "max_pixels": max_pixels})
    return rep


def _lost_samples(ss, seen: np.ndarray) -> list[Issue]:
    """Samples to-shards wrote that no readable tar holds now (a truncated or lost tar): errors named by the
    shard and position they were written at, so that the skip list carries them (training leaves samples in
    no tar out whenever it has a skip list, and refuses them without one)."""
    rec = ss.record()
    order = np.asarray(rec["order"], np.int64) if "order" in rec else np.zeros(0, np.int64)
    counts = [int(s.get("samples", 0)) if isinstance(s.get("samples", 0), int) else 0 for s in ss.manifest["shards"]]
    if sum(counts) != len(order) or (len(order) and (order.min() < 0 or order.max() >= len(seen))):
        return []  # no usable record of where each sample was written
    lost = np.flatnonzero(~seen[order])
    starts = np.cumsum([0] + counts)
    out = []
    for j in lost.tolist():
        s = int(np.searchsorted(starts, j, side="right") - 1)
        sid = int(order[j])
        out.append(make_issue("bad-shard", ss.manifest["shards"][s]["name"], j - int(starts[s]) + 1,
                              f"sample id {sid} is in no readable tar (written here, lost since)", f"{sid:09d}"))
    return out


# ----------------------------------------------------------------------------- skip lists


def write_skip_list(path: str, issues: Iterable[Issue]) -> int:
    """The samples with errors, for data.skip_list (file<TAB>line<TAB>path<TAB>code)."""
    n = 0
    with open(path, "w", errors="surrogateescape") as f:
        f.write(SKIP_HEADER + "\n")
        for i in issues:
            if i.is_error and i.line:
                f.write(f"{i.file}\t{i.line}\t{i.path}\t{i.code}\n")
                n += 1
    return n


# ----------------------------------------------------------------------------- issue 22: shards in a bucket


def validate_bucket_shards(uri: str, *, cache_dir: str = "", **kw) -> Report:
    """validate_shards for s3://bucket/prefix: on the node's view of it (loaders/shard_cache.py; synced first),
    each tar downloaded to a temporary file in a worker; objects missing from the bucket or truncated
    are bad-shard errors. The verdicts go into the view's data index, which training maps."""
    from hvpmtl.data.formats.object_store import ObjectStore
    from hvpmtl.data.loaders.shard_cache import sync_view, view_folder
    store, u = ObjectStore.for_uri(uri)
    folder = view_folder(u, Path(cache_dir) / "views" if cache_dir else None)
    problems = sync_view(store, u, folder, log_fn=lambda m: print(m, flush=True) if kw.get("progress") else None)
    rep = validate_shards(str(folder), bucket=str(u), **kw)
    for p in problems:  # "s3://bucket/prefix/shard-000001.tar: what is wrong"
        obj, _, what = p.partition(": ")
        rep.issues.append(make_issue("bad-shard", obj.rsplit("/", 1)[-1], 0, what))
    rep.issues.sort(key=lambda i: (i.file, i.line))
    return rep
