"""Shards in a bucket, seen from a node: a local *view* of the shard folder's metadata, and an optional
node-local cache of the tars (data.cache_dir, data.cache_limit_gb).

The view (`<root>/<bucket>/<prefix>/`, root = data.cache_dir or ~/.cache/hvpmtl/s3) holds copies of
manifest.json, labels.npz and the DALI .idx files, and for every tar an empty sparse placeholder of the
object's size (no disk blocks): the shard folder as the data index (formats/index_*.py) and the skip policy
(prepare.py) know it, so both work unchanged and training maps a local index. Every copy and
placeholder gets the object's Last-Modified as its mtime, so views made on different nodes are
identical and one data index fits all of them. Start-up reads one object (manifest.json: also the
check that endpoint, credentials and bucket work) and compares it with the view's; only a changed
manifest, or a new node, lists the prefix and copies the metadata again. A tar that is missing from
the bucket, or whose size is not the manifest's (truncated), is left out of the view: its samples are
then in no shard, which the skip policy counts (data.skip_corrupt) or refuses, naming them.

The cache keeps tars read by the node's ranks under a size limit, least recently used out first. A
download is written aside and renamed (a killed writer leaves no partial tar; its `.part-*` file is
removed by the next cache user on the host), under an exclusive lock file per tar (one download per node,
the other ranks wait; a dead holder's lock is broken). Eviction unlinks: a rank that has the tar open
keeps reading it. A miss streams from the bucket (DALI reads the s3:// URI) while a background thread
copies the tar in for the next epoch.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.formats.object_store import ObjectInfo, ObjectStore, S3Uri
from hvpmtl.data.formats.shards import LABELS, MANIFEST, index_count
from hvpmtl.locks import HeartbeatLock, process_alive

log = logging.getLogger(__name__)

SYNCED = ".bucket-manifest.json"  # the bucket's manifest.json as of the last complete sync; written last
README = "HVPMTL_BUCKET_VIEW.txt"
LOCK_POLL_S = 0.2


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hvpmtl" / "s3"


def view_folder(uri: S3Uri, root: str | Path | None = None) -> Path:
    return Path(root or default_root()) / uri.bucket / (uri.key or "_bucket_root")


# ----------------------------------------------------------------------------- locks


class FileLock:
    """One writer per file across the ranks of a node (and the nodes sharing a cache folder): a HeartbeatLock
    (hvpmtl/locks.py: a holder gone from this host, or one whose heartbeat stopped, is taken over) waited on
    for `wait_s`. `acquire()` returns False when `done()` became true while waiting."""

    def __init__(self, path: Path, wait_s: float = 600.0):
        self.path, self.wait_s = Path(path), wait_s
        self._lock = HeartbeatLock(self.path, lambda m: log.warning("%s", m), name="hvpmtl-cache-lock")

    def acquire(self, done: Callable[[], bool] = lambda: False) -> bool:
        start = time.monotonic()
        while not self._lock.try_acquire():
            if done():
                return False
            if time.monotonic() - start > self.wait_s:
                raise DataError(f"waited {self.wait_s:.0f} s for {self.path} (held by {self._lock.holder()}); "
                                "remove it if that process is gone")
            time.sleep(LOCK_POLL_S)
        return True

    def release(self) -> None:
        self._lock.release()


def remove_dead_parts(folder: Path) -> None:
    """Partial downloads (`.NAME.part-HOST-PID`) of processes of this host that are gone."""
    host = socket.gethostname()
    for p in folder.glob(".*.part-*"):
        h, _, pid = p.name.rpartition(".part-")[2].rpartition("-")
        if h == host and pid.isdigit() and not process_alive(int(pid), None):
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the view


def _set_mtime(path: Path, info: ObjectInfo) -> None:
    os.utime(path, ns=(info.mtime_ns, info.mtime_ns))


def _write_atomic(path: Path, data: bytes, mtime_ns: Optional[int] = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, path)


def sync_view(store: ObjectStore, uri: S3Uri, folder: str | Path, *, wait_s: float = 600.0,
              log_fn: Callable[[str], None] = print) -> list[str]:
    """Bring the local view of the shard folder at `uri` up to date; returns the problems found with
    its objects (missing or truncated tars), each naming the object. See the module's doc."""
    folder = Path(folder)
    m_key = uri.child(MANIFEST).key
    bucket_manifest = store.get_bytes(m_key)
    try:
        manifest = json.loads(bucket_manifest)
        shards = manifest["shards"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{uri.child(MANIFEST)} in {store.where}: not a shard manifest ({e}); write shards with "
                        "`hvpmtl data to-shards --out s3://...`") from None
    synced = folder / SYNCED

    def fresh() -> bool:
        try:
            return synced.read_bytes() == bucket_manifest
        except OSError:
            return False
    if fresh():
        return _problems(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder.with_name(folder.name + ".sync.lock"), wait_s=wait_s)
    if not lock.acquire(fresh):
        return _problems(folder)
    try:
        if fresh():
            return _problems(folder)
        synced.unlink(missing_ok=True)
        remove_dead_parts(folder)
        listing = store.list(uri.key)
        log_fn(f"syncing the shard metadata of {uri} ({len(shards)} shards) into {folder}")
        problems = []
        labels = listing.get(LABELS)
        if labels is None:
            raise DataError(f"{uri.child(LABELS)}: not found in {store.where}; the shard folder is incomplete "
                            "(rewrite it with `hvpmtl data to-shards`)")
        wanted = {LABELS: labels}
        kept = []
        for s in shards:
            tar, idx = s["name"], os.path.splitext(s["name"])[0] + ".idx"
            t, i = listing.get(tar), listing.get(idx)
            if t is None:
                problems.append(f"{uri.child(tar)}: missing in {store.where} (listed in manifest.json)")
            elif "bytes" in s and t.size != int(s["bytes"]):
                problems.append(f"{uri.child(tar)}: {t.size} bytes in {store.where}, manifest.json says {s['bytes']} "
                                "(truncated or replaced)")
            elif i is None:
                problems.append(f"{uri.child(idx)}: missing in {store.where} (write it with `hvpmtl data "
                                "index-shards`)")
            else:
                wanted[idx] = i
                kept.append((s, t))
                continue
        todo = [(n, info) for n, info in wanted.items() if not _same(folder / n, info)]
        store.map(lambda item: _fetch_meta(store, uri, folder, *item), todo)
        for s, t in kept:  # sparse placeholders: the tar's size, no blocks
            p = folder / s["name"]
            if not _same(p, t):
                with open(p, "wb") as f:
                    f.truncate(t.size)
                _set_mtime(p, t)
        names = {n for n in wanted} | {s["name"] for s, _ in kept}
        for p in folder.iterdir():  # shards no longer in the manifest
            if p.is_file() and p.suffix in (".tar", ".idx") and p.name not in names:
                p.unlink()
        view_manifest = dict(manifest, shards=[s for s, _ in kept])
        if len(kept) < len(shards):
            view_manifest["left_out_objects"] = problems
        m_info = listing.get(MANIFEST) or ObjectInfo(len(bucket_manifest), 0, "")
        _write_atomic(folder / MANIFEST, json.dumps(view_manifest, indent=1).encode(), m_info.mtime_ns)
        (folder / README).write_text(
            f"Metadata of the shard folder {uri} (manifest.json, labels.npz, the DALI .idx files).\n"
            "The .tar files here are empty sparse placeholders of the objects' sizes: the images are in the "
            "bucket.\nWritten by hvpmtl (hvpmtl/data/loaders/shard_cache.py); safe to delete.\n")
        _write_atomic(synced, bucket_manifest)
        for p in problems:
            log_fn(f"warning: {p}; its samples are in no shard (left out with data.skip_corrupt, else refused)")
        return problems
    finally:
        lock.release()


def _same(path: Path, info: ObjectInfo) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == info.size and st.st_mtime_ns == info.mtime_ns


def _fetch_meta(store: ObjectStore, uri: S3Uri, folder: Path, name: str, info: ObjectInfo) -> None:
    dest = folder / name
    store.download(uri.child(name).key, dest, expect_size=info.size)
    _set_mtime(dest, info)


def _problems(folder: Path) -> list[str]:
    try:
        return list(json.loads((folder / MANIFEST).read_text()).get("left_out_objects", []))
    except (OSError, ValueError):
        return []


# ----------------------------------------------------------------------------- the tar cache


class ShardCache:
    """Tars of one bucket prefix on local disk, at most `limit_bytes` (LRU by mtime, touched on use)."""

    def __init__(self, folder: str | Path, limit_bytes: int, store: ObjectStore, uri: S3Uri):
        self.folder, self.limit, self.store, self.uri = Path(folder), int(limit_bytes), store, uri
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_dead_parts(self.folder)
        self._queue: Optional[queue.Queue] = None
        self.fetched = 0  # tars this process copied in

    def path(self, name: str, size: Optional[int] = None) -> Optional[Path]:
        """The cached copy, touched as just used; None on a miss."""
        p = self.folder / name
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        if size is not None and st.st_size != size:
            return None
        try:
            os.utime(p)
        except FileNotFoundError:  # evicted just now
            return None
        return p

    def fetch(self, name: str, size: int) -> Optional[Path]:
        """Copy the tar in (once per node: the others wait on its lock); None when it cannot fit."""
        if size > self.limit:
            return None
        got = self.path(name, size)
        if got is not None:
            return got
        lock = FileLock(self.folder / f".{name}.lock")
        if not lock.acquire(lambda: (self.folder / name).exists()):
            return self.path(name, size)
        try:
            got = self.path(name, size)
            if got is not None:
                return got
            self.evict(size, keep=name)
            self.store.download(self.uri.child(name).key, self.folder / name, expect_size=size)
            self.fetched += 1
            return self.folder / name
        finally:
            lock.release()

    def evict(self, need: int, keep: str = "") -> list[str]:
        """Unlink least recently used tars until `need` more bytes fit under the limit."""
        entries = []
        for p in self.folder.glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, p))
        entries.sort()
        total = sum(e[1] for e in entries)
        gone = []
        for _, size, p in entries:
            if total + need <= self.limit:
                break
            if p.name == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            gone.append(p.name)
        return gone

    def prefetch(self, items: list[tuple[str, int]]) -> None:
        """Copy these tars in the background (one thread per process), in order."""
        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._worker, name="hvpmtl-shard-cache", daemon=True).start()
        for it in items:
            self._queue.put(it)

    def _worker(self) -> None:
        while True:
            name, size = self._queue.get()
            try:
                self.fetch(name, size)
            except Exception as e:  # the cache is an optimisation: DALI still reads the bucket
                log.warning("shard cache: could not copy %s: %s", self.uri.child(name), e)
            finally:
                self._queue.task_done()

    def wait(self) -> None:
        if self._queue is not None:
            self._queue.join()


# ----------------------------------------------------------------------------- what DALI reads


def dali_share(counts: list[int], shard_id: int, num_shards: int) -> range:
    """The tars (positions) DALI's reader touches for shard `shard_id` of `num_shards` with
    stick_to_shard: samples [N*k/S, N*(k+1)/S) of the tars' samples laid end to end."""
    n = sum(counts)
    lo, hi = n * shard_id // num_shards, n * (shard_id + 1) // num_shards
    first = last = None
    acc = 0
    for t, c in enumerate(counts):
        if c and acc < hi and acc + c > lo:
            first = t if first is None else first
            last = t
        acc += c
    return range(0) if first is None else range(first, last + 1)


class BucketShards:
    """The tars of a prepared shard plan (hvpmtl/data/loaders/prepare.py ShardPlan) in the bucket: per epoch,
    the paths DALI reads, each the cached copy when there is one, else the s3:// URI."""

    def __init__(self, plan, uri: S3Uri, store: ObjectStore, sizes: dict[str, int], cache: Optional[ShardCache]):
        self.plan, self.uri, self.store, self.cache = plan, uri, store, cache
        self.names = [os.path.basename(t) for t in plan.tars]
        self.sizes = [int(sizes[n]) for n in self.names]
        self.counts = [index_count(p) for p in plan.index_paths]

    def uris(self) -> list[str]:
        return [str(self.uri.child(n)) for n in self.names]

    def paths_for(self, rank: int, world_size: int, epoch: int) -> list[str]:
        """What fn.readers.webdataset reads in `epoch` (shard_id = (rank + epoch) % world, dali_loader.py)."""
        if self.cache is None:
            return self.uris()
        mine = set(dali_share(self.counts, (rank + epoch) % world_size, world_size))
        out, missing = [], []
        for t, (n, size) in enumerate(zip(self.names, self.sizes)):
            if t in mine:
                p = self.cache.path(n, size)  # touched: used now
            else:  # opened by DALI but not read this epoch: a copy if there is one, not touched
                p = self.cache.folder / n if _size(self.cache.folder / n) == size else None
            out.append(str(p) if p is not None else str(self.uri.child(n)))
            if t in mine and p is None:
                missing.append((n, size))
        if missing:
            self.cache.prefetch(missing)
        return out


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return -1


def prepare_bucket_shards(uri_text: str, *, cache_dir: str, cache_limit_gb: float, num_classes, skip_corrupt: bool,
                          skip_list: str, max_pixels: int, index, log_fn: Callable[[str], None] = print):
    """prepare.prepare_shards for `s3://bucket/prefix`: the view synced (one request when fresh), the data
    index of the view mapped (built when missing and small, as for a local folder), and `.bucket` on the
    result: the BucketShards that gives DALI its paths. Errors (endpoint, credentials, bucket) are
    DataErrors naming the endpoint and bucket, raised before any model is built."""
    from hvpmtl.data.formats.object_store import dali_environment
    from hvpmtl.data.loaders.prepare import prepare_shards
    store, uri = ObjectStore.for_uri(uri_text)
    root = Path(cache_dir) / "views" if cache_dir else None
    folder = view_folder(uri, root)
    sync_view(store, uri, folder, wait_s=getattr(index, "wait_s", 600.0), log_fn=log_fn)
    data = prepare_shards(str(folder), num_classes=num_classes, skip_corrupt=skip_corrupt, skip_list=skip_list,
                          max_pixels=max_pixels, index=index)
    sizes = {os.path.basename(t): _size(Path(t)) for t in data.shards.tars}
    cache = None
    if cache_dir and cache_limit_gb > 0:
        cache = ShardCache(view_folder(uri, Path(cache_dir) / "tars"), int(cache_limit_gb * 2**30), store, uri)
    data.bucket = BucketShards(data.shards, uri, store, sizes, cache)
    data.shards.tars = data.bucket.uris()
    dali_environment(store)
    return data
