"""The base of the DALI loaders: per-epoch pipelines with resumable state (EpochLoader; the pre-training,
ImageFolder and multi-label loaders subclass it) and the evaluation pass over every sample once (EvalLoader).

One DALI pipeline per epoch, seeded from (seed, rank, epoch); a resume restores its DALI checkpoint (RNG state
and position), so a resumed loader yields the very batches, pixels included, that an uninterrupted one would.
The order of samples and a resume over a changed data set: order.py; reading the files: file_reader.py.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hvpmtl.data.formats import jpeg
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.loaders import augment
from hvpmtl.data.loaders.file_reader import BatchSource, FileReader, LeftOut, explain_failure
from hvpmtl.data.loaders.order import (epoch_batches, kept_positions, pass_order, population_mismatch, population_of,
                                       remaining_order, remap_order, same_population)
from hvpmtl.data.loaders.prepare import Prepared

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


@dataclass
class LoaderPosition:
    """Where a loader stands: what state_dict saves and a resume restores."""
    epoch: int = 0
    start: int = 0  # global position in the epoch's permutation where this pass begins
    consumed: int = 0  # batches consumed since `start`
    restore: Optional[str] = None  # DALI checkpoint for the next pipeline
    fast_forward: int = 0  # shards without a checkpoint: batches to run and drop

    def move_to(self, epoch: int) -> None:
        self.epoch, self.start, self.consumed, self.restore, self.fast_forward = epoch, 0, 0, None, 0


@dataclass
class LivePipeline:
    """The DALI pipeline of the pass in progress (or just finished, for reuse by the next epoch)."""
    it: object
    pipe: object
    reader: Optional[FileReader]
    source: Optional[BatchSource]
    key: tuple  # (epoch, start) of its pass
    ended: bool = False  # it finished its pass cleanly

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


class EpochLoader(LeftOut):
    """An epoch-based DALI loader with resumable state; subclasses give the views and the batch dict.

    Samples come from a prepared list under `root` (external_source, global per-epoch permutation)
    or, when the prepared data has shards, from fn.readers.webdataset (shard rotated per epoch,
    shuffle in a buffer). `skipped` counts what was left out (at start-up, and while reading);
    `skipped_description()` says it in one line.
    """

    output_names: tuple[str, ...] = ()

    def __init__(self, *, data: Prepared, root: str, batch_size: int, rank: int, world_size: int, local_rank: int,
                 seed: int, dtype, device: str, num_threads: int, skip_corrupt: bool = False,
                 max_pixels: int = jpeg.DEFAULT_MAX_PIXELS, allow_outside_root: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.labels, self.root, self.shards, self.skipped = data.samples, root, data.shards, data.skipped
        self.batch_size, self.rank, self.world_size, self.local_rank = batch_size, rank, world_size, local_rank
        self.seed, self.dtype, self.num_threads = seed, dtype, num_threads
        self.skip_corrupt, self.max_pixels, self.allow_outside_root = skip_corrupt, max_pixels, allow_outside_root
        self.device_kind = resolve_device(device)
        self.device = torch.device("cuda", local_rank) if self.device_kind == "gpu" else torch.device("cpu")
        self.half = self.device_kind == "gpu" and dtype in (torch.float16, torch.bfloat16)
        self.num_samples = len(self.labels)
        if len(self) == 0:
            raise DataError(f"{self.num_samples} samples make no batch of {batch_size} on each of {world_size} ranks")
        self.pos = LoaderPosition()
        self._live: Optional[LivePipeline] = None
        self._population: Optional[dict] = None
        self._order: Optional[np.ndarray] = None  # this epoch's dense ids after a resume over a changed population
        self._base: Optional[dict] = None  # the saved state that order derives from (kept in state_dict)
        self.resume_note = ""  # what the last load_state_dict changed, for the trainer's log

    # -- subclass hooks --------------------------------------------------------------

    def _views(self, images) -> tuple:
        raise NotImplementedError

    def _finish(self, out: dict, ids: torch.Tensor) -> dict:
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.pos.epoch

    def __len__(self) -> int:
        """Batches per epoch on each rank (the same on every rank)."""
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.pos.epoch:
            if self._live is not None and not self._live.ended:  # a pass left early: its batches are in flight
                self._close()
            self.pos.move_to(epoch)
            self._order = self._base = None

    def state_dict(self) -> dict:
        """This rank's position: save one per rank (the DALI part holds this rank's RNG state)."""
        p = self.pos
        cp = p.restore
        if self._live is not None and 0 < p.consumed < self._pass_len():
            cp = self._live.it.checkpoints()[0]
        sd = {"epoch": p.epoch, "start": p.start, "position": p.consumed, "rank": self.rank,
              "world_size": self.world_size, "batch_size": self.batch_size, "num_samples": self.num_samples,
              "seed": self.seed, "format": "shards" if self.shards else "list", "dali": cp}
        if self.shards is None:
            sd["population"], sd["remap"] = self.population(), self._base
        return sd

    def population(self) -> dict:
        if self._population is None:
            self._population = population_of(self.labels)
        return self._population

    def check_resume(self, sd: dict) -> None:
        """A DataError when a saved state belongs to another data set or data order (cheap: a trainer calls it
        before building the model); samples left out or added at the end are not another data set."""
        options = ("Resume with the data set and data.seed the checkpoint was trained on, or start a new run on "
                   "this data: --resume fresh (moves this run's files to superseded/) or another run.output_dir")
        if sd["seed"] != self.seed:
            raise DataError(f"the checkpoint's data order was drawn with data.seed {sd['seed']}, this run has "
                            f"{self.seed}: the order cannot continue. {options}")
        saved = sd.get("population")
        if self.shards is not None or saved is None:  # shards, or a checkpoint from before populations
            if sd["num_samples"] != self.num_samples:
                raise DataError(f"data loader state is for {sd['num_samples']} samples, this loader has "
                                f"{self.num_samples}: the data set changed since the checkpoint. {options}")
            return
        why = population_mismatch(saved, self.labels)
        if why:
            raise DataError(f"{self.labels.source} is not the data set this run was trained on: {why}. {options}")

    def load_state_dict(self, sd: dict) -> None:
        self._close()
        self.check_resume(sd)
        p = self.pos
        p.move_to(int(sd["epoch"]))
        self._order = self._base = None
        self.resume_note = ""
        saved = sd.get("population")
        if self.shards is None and saved is not None and (sd.get("remap") is not None or
                                                          not same_population(saved, self.population())):
            if self._resume_over(sd):
                return
        same_split = (sd["world_size"], sd["batch_size"]) == (self.world_size, self.batch_size)
        usable_cp = bool(same_split and sd["rank"] == self.rank and sd.get("dali") and sd["position"] > 0)
        consumed = sd["start"] + sd["position"] * sd["batch_size"] * sd["world_size"]
        if usable_cp:
            p.start, p.consumed, p.restore = sd["start"], sd["position"], sd["dali"]
        elif self.shards is None:
            # the same samples from the saved global position on; augmentation draws start afresh
            p.start = consumed
            if sd["position"]:
                log.warning("data loader resumes epoch %d at sample %d without a DALI checkpoint for rank %d: "
                            "same samples, new augmentation draws", p.epoch, consumed, self.rank)
        elif same_split:
            p.consumed = p.fast_forward = sd["position"]
        else:
            log.warning("shard loader state was saved with another world size or batch size: epoch %d restarts",
                        p.epoch)

    def _resume_over(self, sd: dict) -> bool:
        """Resume inside an epoch whose order is not the plain permutation: the population changed since the
        checkpoint (True: the position is set, a pass over the rest starts), or the checkpoint was itself
        taken inside such an epoch (False: its order is restored here, the position as usual)."""
        cur = self.population()
        keep = getattr(self.labels, "keep", None)

        def dense(stable):
            return stable if keep is None else np.searchsorted(keep, stable).astype(np.int64)
        if same_population(sd["population"], cur):
            self._order, self._base = dense(pass_order(sd)), sd["remap"]
            return False
        remaining, dropped, added = remap_order(remaining_order(sd), sd["population"], cur, self.seed, int(sd["epoch"]))
        self._order = dense(remaining)
        self._base = {k: v for k, v in sd.items() if k != "dali"}
        was, now = len(kept_positions(sd["population"])), self.num_samples
        self.resume_note = (f"the data set changed since the checkpoint: {was} -> {now} samples "
                            f"({len(np.setdiff1d(kept_positions(sd['population']), kept_positions(cur)))} left out, "
                            f"{added} added); epoch {sd['epoch']} continues by sample id with its "
                            f"{len(remaining) - added + dropped} samples not yet seen, {dropped} of them now left out, "
                            f"plus the {added} added: {len(self._order)} samples, "
                            f"{len(self._order) // (self.batch_size * self.world_size)} batches per rank")
        log.warning("data loader: %s", self.resume_note)
        return True

    def __iter__(self):
        p = self.pos
        if p.consumed >= self._pass_len() and p.restore is None:
            p.start, p.consumed = 0, 0  # a finished epoch runs again unless set_epoch moved on
        key, live = (p.epoch, p.start), self._live
        if live is not None and p.consumed > 0 and live.key == key and not p.fast_forward:
            pass  # a pass left early (break) carries on where it stopped
        elif live is not None and live.ended and self.shards is None and p.restore is None and p.consumed == 0:
            # the list pipeline is reused across epochs: new ids for the source, then DALI's reset
            live.source.batches = epoch_batches(self.num_samples, self.batch_size, self.world_size, self.rank,
                                                self.seed, p.epoch, p.start, self._order)
            live.it.reset()
            live.ended, live.key = False, key
        else:
            self._open()
        try:
            while p.fast_forward > 0:
                self._next()
                p.fast_forward -= 1
            while p.consumed < self._pass_len():
                out = self._next()
                p.consumed += 1
                ids = out["index"].view(-1).to("cpu", torch.int64)
                if self.shards is not None:
                    ids = torch.from_numpy(self.shards.dense(ids.numpy()))
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
        n = self.num_samples if self._order is None else len(self._order)
        return (n - self.pos.start) // (self.batch_size * self.world_size)

    def _open(self) -> None:
        self._close()
        dev, p = self.device_kind, self.pos
        kw = dict(batch_size=self.batch_size, num_threads=self.num_threads,
                  device_id=self.local_rank if dev == "gpu" else None,
                  seed=derive_seed(self.seed, self.rank, p.epoch), enable_conditionals=True,
                  enable_checkpointing=True, checkpoint=p.restore, prefetch_queue_depth=2)
        reader = source = None
        if self.shards is None:
            batches = epoch_batches(self.num_samples, self.batch_size, self.world_size, self.rank, self.seed,
                                    p.epoch, p.start, self._order)
            reader = FileReader(self.root, self.labels, threads=max(2, self.num_threads), max_pixels=self.max_pixels,
                                skip_corrupt=self.skip_corrupt, skipped=self.skipped,
                                allow_outside_root=self.allow_outside_root)
            source = BatchSource(batches, reader)

            @pipeline_def(**kw)
            def pipe():
                jpegs, ids = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                                dtype=[types.UINT8, types.INT64])
                return (*self._views(augment.decode(jpegs, dev)), ids)
        else:
            sh = self.shards

            @pipeline_def(**kw)
            def pipe():
                # the shard assignment rotates per epoch; the reader shuffles inside initial_fill samples
                jpegs, ids = fn.readers.webdataset(
                    paths=sh.tars, index_paths=sh.index_paths, ext=["jpg", "id"], dtypes=[types.UINT8, types.INT64],
                    missing_component_behavior="error", shard_id=(self.rank + p.epoch) % self.world_size,
                    num_shards=self.world_size, random_shuffle=True, initial_fill=1024, stick_to_shard=True,
                    pad_last_batch=True, name="reader")
                return (*self._views(augment.decode(jpegs, dev)), ids)
        built = quiet_build(pipe)
        it = DALIGenericIterator([built], [*self.output_names, "index"], auto_reset=False,
                                 prepare_first_batch=False, last_batch_policy=LastBatchPolicy.PARTIAL)
        self._live = LivePipeline(it, built, reader, source, (p.epoch, p.start))
        p.restore = None

    def _drain(self) -> None:
        """Take the end-of-epoch StopIteration so that DALI's reset() can start the next epoch."""
        try:
            next(self._live.it)
        except StopIteration:
            self._live.ended = True
            return
        raise DataError(f"rank {self.rank}: DALI yielded more than the {self._pass_len()} batches of epoch "
                        f"{self.pos.epoch}")

    def _next(self) -> dict:
        live = self._live
        try:
            return next(live.it)[0]
        except StopIteration:
            raise DataError(f"rank {self.rank}: DALI ran out of samples after {self.pos.consumed} of "
                            f"{self._pass_len()} batches in epoch {self.pos.epoch}") from None
        except DataError:
            raise
        except RuntimeError as e:
            what = self.shards.folder if self.shards else self.labels.source
            raise explain_failure(e, live.reader, live.source, str(what)) from e

    def _close(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None

    def __del__(self):
        try:
            self._close()
        except Exception:
            pass


class EvalLoader(LeftOut):
    """Single view, no augmentation (resize + centre crop), every sample once over all ranks.

    Rank r takes ids r, r+W, r+2W, ... in order, in batches of B with a partial last one, so ranks
    may differ by one batch. Batches: {"image": [B,3,S,S], "index": [B]} plus "labels" [B,C]
    float32 (multi-label table) or "label" [B] int64 (single-label). A sample that fails when read
    is an error, or with skip_corrupt is replaced by the next readable one (FileReader).
    """

    def __init__(self, *, data: Prepared, root: str, batch_size: int, rank: int, world_size: int,
                 local_rank: int, img_size: int, device: str, num_threads: int, dtype=torch.float32,
                 table=None, int_labels: Optional[np.ndarray] = None, skip_corrupt: bool = False,
                 max_pixels: int = jpeg.DEFAULT_MAX_PIXELS, allow_outside_root: bool = False):
        self.labels, self.root, self.img_size, self.num_threads = data.samples, root, img_size, num_threads
        self.skipped = data.skipped
        self.batch_size, self.rank, self.world_size, self.local_rank, self.dtype = (
            batch_size, rank, world_size, local_rank, dtype)
        self.skip_corrupt, self.max_pixels, self.allow_outside_root = skip_corrupt, max_pixels, allow_outside_root
        self.device_kind = resolve_device(device)
        self.device = torch.device("cuda", local_rank) if self.device_kind == "gpu" else torch.device("cpu")
        self.half = self.device_kind == "gpu" and dtype in (torch.float16, torch.bfloat16)
        self.table = table
        self.int_labels = None if int_labels is None else torch.from_numpy(np.asarray(int_labels, np.int64))
        self.num_samples = len(self.labels)
        ids = np.arange(rank, self.num_samples, world_size)
        self.batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        reader = FileReader(self.root, self.labels, threads=max(2, self.num_threads), max_pixels=self.max_pixels,
                            skip_corrupt=self.skip_corrupt, skipped=self.skipped,
                            allow_outside_root=self.allow_outside_root)
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
                except DataError:
                    raise
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
