"""The machinery shared by the DALI loaders: sample order, file reading, per-epoch pipelines,
resumable state, and errors that name files.

Sampling (list files): epoch e is the permutation default_rng([seed, e]) of the sample ids; global
batch k is perm[k*B*W : (k+1)*B*W] and rank r takes its r-th B ids, so ranks are disjoint, advance
in lock step, and drop only the last N mod (B*W) ids. One DALI pipeline per epoch, seeded from
(seed, rank, epoch); a resume restores its DALI checkpoint (RNG state and position), so a resumed
loader yields the very batches, pixels included, that an uninterrupted one would.
"""
from __future__ import annotations

import collections
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hvpmtl.data import augment, jpeg
from hvpmtl.data.issues import DataError
from hvpmtl.data.tencent import LabelList

log = logging.getLogger(__name__)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy


def resolve_device(device: str) -> str:
    """'gpu' or 'cpu' for DataConfig.device auto | gpu | cpu."""
    if device == "cpu":
        return "cpu"
    if device == "gpu":
        if not torch.cuda.is_available():
            raise DataError("data.device is 'gpu' but CUDA is not available; use data.device=auto or cpu")
        return "gpu"
    if device != "auto":
        raise DataError(f"data.device must be auto, gpu or cpu, got '{device}'")
    return "gpu" if torch.cuda.is_available() else "cpu"


def derive_seed(*parts: int) -> int:
    """A DALI seed (31 bits) from non-negative integers."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] % (2**31 - 1))


def epoch_batches(num_samples: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
                  start: int = 0) -> np.ndarray:
    """This rank's batches [L, B] of sample ids for `epoch`, from global position `start` on."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    g = batch_size * world_size
    n = (num_samples - start) // g
    return perm[start:start + n * g].reshape(n, world_size, batch_size)[:, rank]


class FileReader:
    """Reads the encoded images of a batch of ids with a few threads (file I/O releases the GIL)."""

    def __init__(self, root: str, labels: LabelList, threads: int = 4):
        self.root, self.labels = Path(root), labels
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="hvpmtl-read")

    def where(self, i: int) -> str:
        return f"{self.labels.source}:{int(self.labels.lines[i])} ({self.labels.path(i)})"

    def path(self, i: int) -> Path:
        return self.root / self.labels.path(int(i))

    def _read(self, i: int) -> np.ndarray:
        try:
            return np.fromfile(self.path(i), dtype=np.uint8)
        except OSError as e:
            raise DataError(f"{self.where(i)}: cannot read {self.path(i)}: {e.strerror}; run `hvpmtl data validate` "
                            "and pass its skip list, or set data.skip_corrupt: true") from None

    def __call__(self, ids) -> list[np.ndarray]:
        return list(self.pool.map(self._read, [int(i) for i in ids]))

    def close(self) -> None:
        self.pool.shutdown(wait=False)


class BatchSource:
    """external_source callback: batch `info.iteration` of a fixed list of id batches.

    A callable taking BatchInfo is what DALI's checkpointing resumes at the saved iteration.
    """

    def __init__(self, batches, reader: FileReader):
        self.batches, self.reader = batches, reader
        self.in_flight: collections.deque = collections.deque(maxlen=4)  # for error messages

    def __call__(self, info):
        k = info.iteration
        if k >= len(self.batches):
            raise StopIteration
        ids = np.asarray(self.batches[k], np.int64)
        self.in_flight.append(ids)
        return self.reader(ids), ids.reshape(-1, 1)


def explain_failure(err: Exception, reader: Optional[FileReader], source: Optional[BatchSource], what: str):
    """A DataError for a DALI failure, naming the in-flight files that do not decode."""
    said = str(err).strip()
    if reader is None or source is None:
        return DataError(f"DALI failed while reading {what}. Run `hvpmtl data validate --full-decode` to find the bad "
                         f"sample and pass its skip list (data.skip_list).\nDALI said: {said[:2000]}")
    bad = []
    for ids in source.in_flight:
        for i in ids:
            code, detail = jpeg.check_file(str(reader.path(i)), full_decode=True)
            if code and code not in ("grayscale", "cmyk"):
                bad.append(f"  {reader.where(i)}: [{code}] {detail}")
    names = "\n".join(bad) or "  (every image in flight decodes with PIL; see what DALI said)"
    return DataError(f"DALI failed to decode a batch of {what}; images in flight that fail a full check:\n{names}\n"
                     "Run `hvpmtl data validate --full-decode` and pass its skip list (data.skip_list), or set "
                     f"data.skip_corrupt: true.\nDALI said: {said[:2000]}")


def quiet_build(pipe_fn):
    """Define the graph, dropping the deprecation notes that RandAugment's fn.experimental calls print."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = pipe_fn()
    for w in caught:
        if not (issubclass(w.category, DeprecationWarning) and "experimental" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return p


def to_device(t: torch.Tensor, device: torch.device, dtype=None) -> torch.Tensor:
    if t.device != device:
        t = t.to(device, non_blocking=True)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


class EpochLoader:
    """An epoch-based DALI loader with resumable state; subclasses give the views and the batch dict.

    Samples come from a LabelList under `root` (external_source, global per-epoch permutation) or,
    with `shards`, from fn.readers.webdataset (shard rotated per epoch, shuffle in a buffer).
    """

    output_names: tuple[str, ...] = ()

    def __init__(self, *, labels: LabelList, root: str, batch_size: int, rank: int, world_size: int,
                 local_rank: int, seed: int, dtype, device: str, num_threads: int, shards=None, skipped: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.labels, self.root, self.shards = labels, root, shards
        self.batch_size, self.rank, self.world_size, self.local_rank = batch_size, rank, world_size, local_rank
        self.seed, self.dtype, self.num_threads = seed, dtype, num_threads
        self.skipped_corrupt = skipped
        self.device_kind = resolve_device(device)
        self.device = torch.device("cuda", local_rank) if self.device_kind == "gpu" else torch.device("cpu")
        self.half = self.device_kind == "gpu" and dtype in (torch.float16, torch.bfloat16)
        self.num_samples = len(labels)
        if len(self) == 0:
            raise DataError(f"{self.num_samples} samples make no batch of {batch_size} on each of {world_size} ranks")
        self.epoch = 0
        self._start = 0  # global position in the epoch's permutation where this pass begins
        self._position = 0  # batches consumed since _start
        self._restore: Optional[str] = None  # DALI checkpoint for the next pipeline
        self._fast_forward = 0  # shards without a checkpoint: batches to run and drop
        self._it = self._pipe = self._reader = self._source = None
        self._ended = False  # the live pipeline finished its pass cleanly
        self._live = None  # (epoch, start) of the live pipeline's pass

    # -- subclass hooks --------------------------------------------------------------

    def _views(self, images) -> tuple:
        raise NotImplementedError

    def _finish(self, out: dict, ids: torch.Tensor) -> dict:
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch on each rank (the same on every rank)."""
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            if not self._ended:  # a pass left early still has that epoch's batches in flight
                self._close()
            self.epoch, self._start, self._position, self._restore, self._fast_forward = epoch, 0, 0, None, 0

    def state_dict(self) -> dict:
        """This rank's position: save one per rank (the DALI part holds this rank's RNG state)."""
        cp = self._restore
        if self._it is not None and 0 < self._position < self._pass_len():
            cp = self._it.checkpoints()[0]
        return {"epoch": self.epoch, "start": self._start, "position": self._position, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "num_samples": self.num_samples,
                "seed": self.seed, "format": "shards" if self.shards else "list", "dali": cp}

    def load_state_dict(self, sd: dict) -> None:
        self._close()
        if sd["num_samples"] != self.num_samples or sd["seed"] != self.seed:
            raise DataError(f"data loader state is for {sd['num_samples']} samples and seed {sd['seed']}, this loader "
                            f"has {self.num_samples} and {self.seed}: the data set or seed changed since the checkpoint")
        self.epoch = int(sd["epoch"])
        same_split = (sd["world_size"], sd["batch_size"]) == (self.world_size, self.batch_size)
        usable_cp = bool(same_split and sd["rank"] == self.rank and sd.get("dali") and sd["position"] > 0)
        consumed = sd["start"] + sd["position"] * sd["batch_size"] * sd["world_size"]
        self._restore, self._fast_forward = None, 0
        if usable_cp:
            self._start, self._position, self._restore = sd["start"], sd["position"], sd["dali"]
        elif self.shards is None:
            # the same samples from the saved global position on; augmentation draws start afresh
            self._start, self._position = consumed, 0
            if sd["position"]:
                log.warning("data loader resumes epoch %d at sample %d without a DALI checkpoint for rank %d: "
                            "same samples, new augmentation draws", self.epoch, consumed, self.rank)
        elif same_split:
            self._start, self._position, self._fast_forward = 0, sd["position"], sd["position"]
        else:
            self._start, self._position = 0, 0
            log.warning("shard loader state was saved with another world size or batch size: epoch %d restarts",
                        self.epoch)

    def __iter__(self):
        if self._position >= self._pass_len() and self._restore is None:
            self._start, self._position = 0, 0  # a finished epoch runs again unless set_epoch moved on
        key = (self.epoch, self._start)
        if self._it is not None and self._position > 0 and self._live == key and not self._fast_forward:
            pass  # a pass left early (break) carries on where it stopped
        elif self._it is not None and self._ended and self.shards is None and self._restore is None \
                and self._position == 0:
            # the list pipeline is reused across epochs: new ids for the source, then DALI's reset
            self._source.batches = epoch_batches(self.num_samples, self.batch_size, self.world_size, self.rank,
                                                 self.seed, self.epoch, self._start)
            self._it.reset()
            self._ended, self._live = False, key
        else:
            self._open()
        try:
            while self._fast_forward > 0:
                self._next()
                self._fast_forward -= 1
            while self._position < self._pass_len():
                out = self._next()
                self._position += 1
                ids = out["index"].view(-1).to("cpu", torch.int64)
                if self.shards is not None:
                    ids = torch.from_numpy(self.shards.remap[ids.numpy()])
                yield self._finish(out, ids)
            if self.shards is None:
                self._drain()
            else:
                self._close()  # the next epoch reads another shard: a new reader
        except GeneratorExit:
            raise
        except BaseException:
            self._close()
            raise

    # -- internals ---------------------------------------------------------------------

    def _pass_len(self) -> int:
        return (self.num_samples - self._start) // (self.batch_size * self.world_size)

    def _open(self) -> None:
        self._close()
        dev = self.device_kind
        kw = dict(batch_size=self.batch_size, num_threads=self.num_threads,
                  device_id=self.local_rank if dev == "gpu" else None,
                  seed=derive_seed(self.seed, self.rank, self.epoch), enable_conditionals=True,
                  enable_checkpointing=True, checkpoint=self._restore, prefetch_queue_depth=2)
        if self.shards is None:
            batches = epoch_batches(self.num_samples, self.batch_size, self.world_size, self.rank, self.seed,
                                    self.epoch, self._start)
            self._reader = FileReader(self.root, self.labels, threads=max(2, self.num_threads))
            self._source = BatchSource(batches, self._reader)

            @pipeline_def(**kw)
            def pipe():
                jpegs, ids = fn.external_source(source=self._source, num_outputs=2, batch=True, batch_info=True,
                                                dtype=[types.UINT8, types.INT64])
                return (*self._views(augment.decode(jpegs, dev)), ids)
        else:
            sh = self.shards

            @pipeline_def(**kw)
            def pipe():
                # the shard assignment rotates per epoch; the reader shuffles inside initial_fill samples
                jpegs, ids = fn.readers.webdataset(
                    paths=sh.tars, index_paths=sh.index_paths, ext=["jpg", "id"], dtypes=[types.UINT8, types.INT64],
                    missing_component_behavior="error", shard_id=(self.rank + self.epoch) % self.world_size,
                    num_shards=self.world_size, random_shuffle=True, initial_fill=1024, stick_to_shard=True,
                    pad_last_batch=True, name="reader")
                return (*self._views(augment.decode(jpegs, dev)), ids)
        self._pipe = quiet_build(pipe)
        self._it = DALIGenericIterator([self._pipe], [*self.output_names, "index"], auto_reset=False,
                                       prepare_first_batch=False, last_batch_policy=LastBatchPolicy.PARTIAL)
        self._restore = None
        self._ended, self._live = False, (self.epoch, self._start)

    def _drain(self) -> None:
        """Take the end-of-epoch StopIteration so that DALI's reset() can start the next epoch."""
        try:
            next(self._it)
        except StopIteration:
            self._ended = True
            return
        raise DataError(f"rank {self.rank}: DALI yielded more than the {self._pass_len()} batches of epoch {self.epoch}")

    def _next(self) -> dict:
        try:
            return next(self._it)[0]
        except StopIteration:
            raise DataError(f"rank {self.rank}: DALI ran out of samples after {self._position} of "
                            f"{self._pass_len()} batches in epoch {self.epoch}") from None
        except RuntimeError as e:
            what = self.shards.shards.folder if self.shards else self.labels.source
            raise explain_failure(e, self._reader, self._source, str(what)) from e

    def _close(self) -> None:
        self._it = self._pipe = self._source = None
        self._ended, self._live = False, None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __del__(self):
        try:
            self._close()
        except Exception:
            pass


class EvalLoader:
    """Single view, no augmentation (resize + centre crop), every sample once over all ranks.

    Rank r takes ids r, r+W, r+2W, ... in order, in batches of B with a partial last one, so ranks
    may differ by one batch. Batches: {"image": [B,3,S,S], "index": [B]} plus "labels" [B,C]
    float32 (multi-label table) or "label" [B] int64 (single-label).
    """

    def __init__(self, *, labels: LabelList, root: str, batch_size: int, rank: int, world_size: int,
                 local_rank: int, img_size: int, device: str, num_threads: int, dtype=torch.float32,
                 table=None, int_labels: Optional[np.ndarray] = None, skipped: int = 0):
        self.labels, self.root, self.img_size, self.num_threads = labels, root, img_size, num_threads
        self.batch_size, self.rank, self.world_size, self.local_rank, self.dtype = (
            batch_size, rank, world_size, local_rank, dtype)
        self.skipped_corrupt = skipped
        self.device_kind = resolve_device(device)
        self.device = torch.device("cuda", local_rank) if self.device_kind == "gpu" else torch.device("cpu")
        self.half = self.device_kind == "gpu" and dtype in (torch.float16, torch.bfloat16)
        self.table = table
        self.int_labels = None if int_labels is None else torch.from_numpy(np.asarray(int_labels, np.int64))
        self.num_samples = len(labels)
        ids = np.arange(rank, self.num_samples, world_size)
        self.batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        reader = FileReader(self.root, self.labels, threads=max(2, self.num_threads))
        source = BatchSource(self.batches, reader)
        dev, half, size = self.device_kind, self.half, self.img_size

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=self.local_rank if dev == "gpu" else None, seed=0, prefetch_queue_depth=2)
        def pipe():
            jpegs, ids = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                            dtype=[types.UINT8, types.INT64])
            return augment.eval_view(augment.decode(jpegs, dev), size, half=half), ids

        it = DALIGenericIterator([pipe()], ["image", "index"], auto_reset=False, prepare_first_batch=False,
                                 last_batch_policy=LastBatchPolicy.PARTIAL)
        try:
            for _ in range(len(self.batches)):
                try:
                    out = next(it)[0]
                except RuntimeError as e:
                    raise explain_failure(e, reader, source, self.labels.source) from e
                ids = out["index"].view(-1).to("cpu", torch.int64)
                batch = {"image": to_device(out["image"], self.device, self.dtype), "index": to_device(ids, self.device)}
                if self.table is not None:
                    batch["labels"] = self.table.dense(ids, self.device)
                if self.int_labels is not None:
                    batch["label"] = to_device(self.int_labels[ids], self.device)
                yield batch
        finally:
            reader.close()
