"""`hvpmtl data to-shards`: a list file to shuffled webdataset shards with DALI indices (the folder's
format is described in hvpmtl/data/formats/shards.py), and the shard folder's data index.

Sample ids are positions among the usable samples of the list (after what the skip policy left
out); samples are shuffled across shards when written, since DALI's reader shuffles only inside a
small buffer. Each image is header-checked (and bounded by max_pixels) on the bytes being copied,
so the shards' verdicts are complete without a separate scan.

Scale: shards are written by processes over all cores, each shard to a temporary name then renamed,
with a record in `<out>/.work/` written last: a killed run resumes with the shards not yet recorded;
`--part i/N` writes a share of the shards on each machine (a Slurm array), and `--merge` (or a run
without --part) writes manifest.json, labels.npz and the data index once every shard is there.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from hvpmtl.data.formats import jpeg
from hvpmtl.data.formats.index_build import build_shard_index
from hvpmtl.data.formats.index_file import DataIndex
from hvpmtl.data.formats.index_format import VERDICT
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.formats.list_parse import csr_take
from hvpmtl.data.formats.shards import FORMAT, LABELS, MANIFEST, write_index  # noqa: F401 (write_index: index-shards)
from hvpmtl.data.loaders.prepare import IndexedSamples, IndexOptions, prepare_list
from hvpmtl.data.tools.jobs import Progress, default_workers, load_npz, part_units, process_pool, save_npz_atomic

WORK = ".work"
NEVER = 2**62
SMALL = 4096  # fewer samples than this are written inline: starting processes would cost more


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards from identical inputs
    tar.addfile(info, io.BytesIO(data))


def write_one_shard(index_path: str, list_file: str, root: str, out_dir: str, shard: int, ids: np.ndarray,
                    positions: np.ndarray, skip_corrupt: bool, max_pixels: int) -> None:
    """Write shard `shard` (in a worker process): samples `ids` (index rows `positions`), in that order."""
    idx = DataIndex(index_path)
    out = Path(out_dir)
    name = f"shard-{shard:06d}"
    tmp_tar, tmp_idx = out / WORK / f"{name}.tar.tmp", out / WORK / f"{name}.idx.tmp"
    n = len(ids)
    verdict, width, height = np.zeros(n, np.uint8), np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    written = np.zeros(n, bool)
    o, blob, lines = idx.path_offsets, idx.path_blob, idx.lines
    with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for j, (i, p) in enumerate(zip(ids.tolist(), positions.tolist())):
            rel = bytes(blob[o[p]:o[p + 1]])
            shown = rel.decode(errors="backslashreplace")
            try:
                data = (Path(root) / os.fsdecode(rel)).read_bytes()
                c = jpeg.check_bytes(data, max_pixels=max_pixels)
            except FileNotFoundError:
                data, c = b"", jpeg.Check("missing-file", f"{Path(root) / os.fsdecode(rel)} not found")
            except OSError as e:
                data, c = b"", jpeg.Check("unreadable", f"{Path(root) / os.fsdecode(rel)}: {e.strerror}")
            verdict[j] = VERDICT[c.code] if c.code else VERDICT["ok"]
            width[j], height[j] = min(c.width, 65535), min(c.height, 65535)
            if not c.usable:
                if not skip_corrupt:
                    raise DataError(f"{list_file}:{int(lines[p])} ({shown}): error [{c.code}]: {c.detail}. Fix it, "
                                    "or run `hvpmtl data validate` and pass its skip list (--read-skip-list), or "
                                    "--skip-corrupt; the shards written so far are kept, a re-run resumes")
                continue
            a, b = int(idx.indptr[p]), int(idx.indptr[p + 1])
            cls, conf = idx.classes[a:b], idx.conf_values(np.arange(a, b))
            meta = {"id": i, "path": shown, "labels": [[int(k), float(f)] for k, f in zip(cls, conf)]}
            key = f"{i:09d}"
            _add(tf, f"{key}.jpg", data)
            _add(tf, f"{key}.id", np.int64(i).tobytes())
            _add(tf, f"{key}.json", json.dumps(meta).encode())
            written[j] = True
    write_index(tmp_tar, tmp_idx)
    h = hashlib.sha256()
    with open(tmp_tar, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    size = tmp_tar.stat().st_size
    os.replace(tmp_tar, out / f"{name}.tar")
    os.replace(tmp_idx, out / f"{name}.idx")
    save_npz_atomic(out / WORK / f"{name}.npz", ids=np.asarray(ids, np.int64), verdict=verdict, width=width,
                    height=height, written=written, size=np.array(size), sha256=np.array(h.hexdigest()))
    idx.close()


def _job(list_file: str, idx: DataIndex, n: int, shard_size: int, seed: int, num_classes, skip_list: str,
         max_pixels: int) -> dict:
    # skip_corrupt is not part of it: shards finished without it hold only good samples, so a run stopped
    # by a bad image may resume with --skip-corrupt
    return {"list": idx.header["key"]["sha256"], "samples": n, "shard_size": shard_size, "seed": seed,
            "num_classes": num_classes, "skip_list": skip_list, "max_pixels": max_pixels}


def write_shards(list_file: str, root: str, out_dir: str, shard_size: int, *, seed: int = 0,
                 num_classes: Optional[int] = None, skip_corrupt: bool = False, skip_list: str = "",
                 max_pixels: int = jpeg.DEFAULT_MAX_PIXELS, workers: Optional[int] = None,
                 part: Optional[tuple[int, int]] = None, merge_only: bool = False, progress: bool = False,
                 index_path: str = "", on_written: Optional[Callable[[int], None]] = None) -> Optional[dict]:
    """Convert a list file to shuffled shards of `shard_size` samples (the last may be smaller).
    Returns the manifest, or None after a `part` (run `merge_only` once every part is done).
    `on_written(shard)` runs in this process after each shard is written (issue 22: its upload)."""
    if shard_size <= 0:
        raise ValueError("shard_size must be > 0")
    data = prepare_list(list_file, root, num_classes=num_classes, skip_corrupt=skip_corrupt, skip_list=skip_list,
                        max_pixels=max_pixels, index=IndexOptions(path=index_path, auto_build_max=NEVER,
                                                                  log=lambda m: None))
    samples: IndexedSamples = data.samples
    idx = data.index
    n = len(samples)
    out = Path(out_dir)
    (out / WORK).mkdir(parents=True, exist_ok=True)
    job = _job(list_file, idx, n, shard_size, seed, num_classes, skip_list, max_pixels)
    job_file = out / WORK / "job.json"
    if job_file.exists() and json.loads(job_file.read_text()) != job:
        raise DataError(f"{out} holds an unfinished conversion with other settings ({job_file}); use the same "
                        "settings to resume it, or remove the folder")
    job_file.write_text(json.dumps(job))
    order = np.random.default_rng([seed, 7]).permutation(n)
    num_shards = -(-n // shard_size)
    units = part_units(num_shards, part) if not merge_only else range(0)
    todo = [s for s in units if not (out / WORK / f"shard-{s:06d}.npz").exists()]
    prog = Progress(f"to-shards {out.name}" + (f" part {part[0]}/{part[1]}" if part else ""),
                    len(todo), unit="shards", enabled=progress)
    args = []
    for s in todo:
        ids = order[s * shard_size:(s + 1) * shard_size]
        args.append((str(idx.path), str(list_file), str(root), str(out), s, ids, samples.positions(ids), skip_corrupt,
                     max_pixels))
    workers = workers or default_workers()
    if workers <= 1 or len(args) <= 1 or n < SMALL:
        for a in args:
            write_one_shard(*a)
            if on_written is not None:
                on_written(a[4])
            prog.add(1)
    else:
        with process_pool(min(workers, len(args))) as pool:
            for f, a in [(pool.submit(write_one_shard, *a), a) for a in args]:
                f.result()
                if on_written is not None:
                    on_written(a[4])
                prog.add(1)
    prog.close()
    if part is not None:
        return None
    return _merge(out, list_file, root, samples, order, num_shards, shard_size, seed, num_classes, data)


def _merge(out: Path, list_file, root, samples: IndexedSamples, order, num_shards, shard_size, seed, num_classes,
           data) -> dict:
    records = [load_npz(out / WORK / f"shard-{s:06d}.npz") for s in range(num_shards)]
    missing = [s for s, r in enumerate(records) if r is None]
    if missing:
        raise DataError(f"{len(missing)} of {num_shards} shards in {out} are not written yet (first: "
                        f"shard-{missing[0]:06d}); run the missing parts (`--part i/N`) before --merge")
    n = len(samples)
    verdict, width, height = np.zeros(n, np.uint8), np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    written = []
    shards = []
    for s, r in enumerate(records):
        verdict[r["ids"]], width[r["ids"]], height[r["ids"]] = r["verdict"], r["width"], r["height"]
        written.append(r["ids"][r["written"]])
        shards.append({"name": f"shard-{s:06d}.tar", "samples": int(r["written"].sum()), "bytes": int(r["size"]),
                       "sha256": str(r["sha256"])})
    idx = samples.index
    pos = samples.positions(np.arange(n))
    path_off, ptake = csr_take(idx.path_offsets.astype(np.int64), pos)
    indptr, ltake = csr_take(idx.indptr.astype(np.int64), pos)
    np.savez(out / LABELS, order=np.concatenate(written) if written else np.zeros(0, np.int64), indptr=indptr,
             classes=idx.classes[ltake], confs=idx.conf_values(ltake), lines=np.asarray(idx.lines[pos], np.int64),
             path_blob=idx.path_blob[ptake], path_offsets=path_off, verdict=verdict, width=width, height=height)
    left_out = int(n - sum(s["samples"] for s in shards))
    manifest = {"format": FORMAT, "num_samples": n - left_out, "num_classes": num_classes, "shard_size": shard_size,
                "shards": shards, "source_list": str(list_file), "root": str(root), "seed": seed,
                "left_out": {"when_written": left_out, **data.skipped.as_dict()}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    build_shard_index(out)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return manifest


# ----------------------------------------------------------------------------- issue 22: --out s3://bucket/prefix


def default_stage(uri: str) -> Path:
    from hvpmtl.data.formats.object_store import S3Uri
    u = S3Uri.parse(uri)
    return Path(".hvpmtl-stage") / u.bucket / (u.key or "_bucket_root")


def _is_placeholder(p: Path) -> bool:
    """An uploaded tar replaced by a sparse file of its size (no disk blocks)."""
    st = p.stat()
    return st.st_size > 0 and st.st_blocks == 0


def write_shards_to_bucket(list_file: str, root: str, out_uri: str, shard_size: int, *, stage_dir: str = "",
                           part: Optional[tuple[int, int]] = None, merge_only: bool = False, **kw) -> Optional[dict]:
    """write_shards to `s3://bucket/prefix`, through a local staging folder (`stage_dir`, default
    .hvpmtl-stage/<bucket>/<prefix>): each shard's tar and .idx are uploaded as soon as they are written and
    the staged tar becomes a sparse placeholder (the stage holds the shards in flight, not the data set);
    labels.npz, then manifest.json go up last (a folder with a manifest is complete). A killed run
    resumes: shards recorded in the stage are not written again, and any the bucket lacks are uploaded.
    `--part i/N` on several machines: each uploads its shards and their work records to <prefix>/.work/;
    `--merge` fetches the records and indices and writes the folder's metadata."""
    from hvpmtl.data.formats.object_store import ObjectStore
    store, uri = ObjectStore.for_uri(out_uri)
    store.check(uri.child(MANIFEST).key)  # endpoint, credentials and bucket, before any work
    stage = Path(stage_dir) if stage_dir else default_stage(out_uri)
    (stage / WORK).mkdir(parents=True, exist_ok=True)
    present = store.list(uri.key)

    def upload_shard(s: int) -> None:
        name = f"shard-{s:06d}"
        for f in (stage / f"{name}.idx", stage / f"{name}.tar"):  # the tar last: it marks the shard uploaded
            have = present.get(f.name)
            if have is not None and have.size == f.stat().st_size:
                continue
            if f.suffix == ".tar" and _is_placeholder(f):
                raise DataError(f"{uri.child(f.name)}: uploaded earlier but not in {store.where} now; remove "
                                f"{stage / WORK / (name + '.npz')} and run the command again to rewrite it")
            store.upload(f, uri.child(f.name).key)
        if part is not None:
            store.upload(stage / WORK / f"{name}.npz", uri.child(f"{WORK}/{name}.npz").key)
        tar = stage / f"{name}.tar"
        if not _is_placeholder(tar):
            size = tar.stat().st_size
            with open(tar, "r+b") as fh:  # free the disk: keep a sparse file of the size (build_shard_index reads it)
                fh.truncate(0)
                fh.truncate(size)

    def staged_shards() -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in (stage / WORK).glob("shard-*.npz"))

    if merge_only:
        _fetch_parts(store, uri, stage)
    else:
        for s in staged_shards():  # a killed run: shards written but maybe not uploaded
            upload_shard(s)
    manifest = write_shards(list_file, root, str(stage), shard_size, part=part, merge_only=merge_only,
                            on_written=upload_shard, **kw)
    if manifest is None:
        return None
    store.upload(stage / LABELS, uri.child(LABELS).key)
    store.put_bytes(uri.child(MANIFEST).key, (stage / MANIFEST).read_bytes())
    for k in [k for k in store.list(uri.child(WORK).key)]:
        store.delete(uri.child(f"{WORK}/{k}").key)
    return manifest


def _fetch_parts(store, uri, stage: Path) -> None:
    """For --merge: the parts' work records and DALI indices, and placeholders of their tars."""
    records = store.list(uri.child(WORK).key)
    present = store.list(uri.key)

    def get(item):
        name, info = item
        dest = stage / WORK / name
        if not dest.exists() or dest.stat().st_size != info.size:
            store.download(uri.child(f"{WORK}/{name}").key, dest, expect_size=info.size)
        base = name[:-len(".npz")]
        idx = stage / f"{base}.idx"
        if not idx.exists() and f"{base}.idx" in present:
            store.download(uri.child(f"{base}.idx").key, idx)
        tar = stage / f"{base}.tar"
        if not tar.exists() and f"{base}.tar" in present:
            with open(tar, "wb") as fh:
                fh.truncate(present[f"{base}.tar"].size)
    store.map(get, [(n, i) for n, i in records.items() if n.endswith(".npz")])
