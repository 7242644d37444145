"""The order of samples, and where a resumed loader picks it up.

Sampling: epoch e is the permutation default_rng([seed, e]) of the sample ids; global batch k is
perm[k*B*W : (k+1)*B*W] and rank r takes its r-th B ids, so ranks are disjoint, advance in lock step, and drop
only the last N mod (B*W) ids (epoch_batches: the DALI loaders, and the dense tasks' PIL loaders).

A changed data set on resume (issue 23): the saved state names its population, the samples' stable ids
(positions in the data index: dense id i is position keep[i]) as the index size, the positions left out and
a probe of paths. Samples left out since (skip list, skip_corrupt, a validator verdict) or added at the end
change the population, not the data set: the rest of the epoch is the saved epoch's remaining samples by
stable id, those still usable, then the added ones (shuffled), and the next epoch is a plain permutation
again. A saved state inside such an epoch carries the state it was derived from (`remap`), so a second
resume rebuilds the same order. Another list (the probe's paths differ, or the index shrank) or another
seed is a DataError before the model is built (EpochLoader.check_resume).

SampleOrder: the resumable position of the dense tasks' training loaders (COCO, ADE20K), which read files with
PIL threads instead of DALI: epoch e's batches from global sample position `start`, of which this rank has used
`consumed`. A saved position restores exactly on the same ranks and batch size; on others the same global
position is re-split over the new ranks (the draws are per sample).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from hvpmtl.data.formats.issues import DataError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """default_rng([seed, epoch]).permutation(N), made in int32 where N allows (the same shuffle of the same
    values: half the transient memory at 17.6M samples)."""
    perm = np.arange(num_samples, dtype=np.int32 if num_samples < 2**31 else np.int64)
    np.random.default_rng([seed, epoch]).shuffle(perm)
    return perm


def epoch_batches(num_samples: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
                  start: int = 0, order: Optional[np.ndarray] = None) -> np.ndarray:
    """This rank's batches [L, B] of sample ids for `epoch`, from global position `start` on.

    The epoch's order is epoch_permutation(N, seed, epoch), or `order` (a resumed epoch over a changed
    population: see EpochLoader.load_state_dict)."""
    perm = epoch_permutation(num_samples, seed, epoch) if order is None else order
    num_samples = len(perm)
    g = batch_size * world_size
    n = (num_samples - start) // g
    return perm[start:start + n * g].reshape(n, world_size, batch_size)[:, rank].astype(np.int64)


# ----------------------------------------------------------------------------- the population on resume

PROBE_SAMPLES = 32  # paths kept in a saved state to tell the same list (with samples left out or added) from another
REMAP_STREAM = 23  # default_rng([seed, epoch, REMAP_STREAM]) shuffles the samples added on a resume


def _index_of(labels):
    return getattr(labels, "index", None)


def _stable_total(labels) -> int:
    index = _index_of(labels)
    return int(index.num_samples) if index is not None else len(labels)


def _at_position(labels, pos: int) -> tuple[int, str]:
    """(line, path) of the sample at stable position `pos` (kept or not)."""
    index = _index_of(labels)
    if index is None:
        return int(labels.line(pos)), labels.path(pos)
    o = index.path_offsets
    return int(index.lines[pos]), bytes(index.path_blob[int(o[pos]):int(o[pos + 1])]).decode(errors="backslashreplace")


def population_of(labels) -> dict:
    """The samples a loader serves, by stable id: the index size, the positions left out (a tensor: a
    checkpoint holds plain data) and [position, line, path] at PROBE_SAMPLES evenly spread positions."""
    total = _stable_total(labels)
    keep = getattr(labels, "keep", None)
    if keep is None:
        left_out = np.zeros(0, np.int64)
    else:
        mask = np.ones(total, bool)
        mask[keep] = False
        left_out = np.flatnonzero(mask).astype(np.int64)
    probe = [[int(q), *_at_position(labels, int(q))] for q in np.unique(np.linspace(0, total - 1, PROBE_SAMPLES)
                                                                          .astype(np.int64))]
    return {"total": total, "left_out": torch.from_numpy(left_out), "probe": probe}


def kept_positions(pop: dict) -> np.ndarray:
    """Sorted stable positions of a population's samples: dense id i is kept_positions(pop)[i]."""
    left = np.asarray(pop["left_out"], np.int64)
    mask = np.ones(int(pop["total"]), bool)
    mask[left] = False
    return np.flatnonzero(mask).astype(np.int64)


def same_population(a: dict, b: dict) -> bool:
    return int(a["total"]) == int(b["total"]) and np.array_equal(np.asarray(a["left_out"], np.int64),
                                                                 np.asarray(b["left_out"], np.int64))


def population_mismatch(saved: dict, labels) -> str:
    """'' when `labels` holds the saved population's data set (samples may be left out or added at the end),
    else what differs."""
    total = _stable_total(labels)
    if total < int(saved["total"]):
        return (f"its index holds {total} samples, the checkpoint's held {saved['total']}: lines were removed "
                "(leave bad samples out with data.skip_list or data.skip_corrupt instead: their lines keep their place)")
    for pos, line, path in saved["probe"]:
        now_line, now = _at_position(labels, int(pos))
        if now != path:
            return f"sample {pos} was '{path}' (line {line}), it is now '{now}' (line {now_line})"
    return ""


def remap_order(remaining: np.ndarray, old: dict, new: dict, seed: int, epoch: int) -> tuple[np.ndarray, int, int]:
    """The rest of an epoch over a changed population, in stable positions: the saved epoch's `remaining`
    samples still in `new`, then those `new` adds (shuffled from seed and epoch); with how many of the
    remaining were dropped and how many were added."""
    new_keep = kept_positions(new)
    still = np.isin(remaining, new_keep)
    added = np.setdiff1d(new_keep, kept_positions(old), assume_unique=True)
    added = np.random.default_rng([seed, epoch, REMAP_STREAM]).permutation(added)
    return np.concatenate([remaining[still], added]), int(len(remaining) - still.sum()), int(len(added))


def pass_order(sd: dict) -> np.ndarray:
    """Stable positions, in order, of the pass a saved state stands in (its `start` counts from the first)."""
    if sd.get("remap") is None:
        return kept_positions(sd["population"])[epoch_permutation(int(sd["num_samples"]), sd["seed"], sd["epoch"])]
    return remap_order(remaining_order(sd["remap"]), sd["remap"]["population"], sd["population"], sd["seed"],
                       sd["epoch"])[0]


def remaining_order(sd: dict) -> np.ndarray:
    """Stable positions of the samples of the saved epoch that the saved state had not consumed yet."""
    consumed = int(sd["start"]) + int(sd["position"]) * int(sd["batch_size"]) * int(sd["world_size"])
    return pass_order(sd)[consumed:]


class SampleOrder:
    what = "loader"  # named in the refusal of another data set's state

    def __init__(self, samples, batch_size: int, rank: int, world_size: int, seed: int, where):
        """samples: the split (its len is the sample count); where(): names it in an error."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples, self.batch_size, self.rank, self.world_size, self.seed = (
            len(samples), batch_size, rank, world_size, seed)
        if len(self) == 0:
            raise DataError(f"{where()}: {self.num_samples} images make no batch of {batch_size} on each of "
                            f"{world_size} ranks")
        self.epoch, self.start, self.consumed = 0, 0, 0

    def __len__(self) -> int:
        """Batches per epoch on each rank (the same on every rank; the last N mod (B*W) samples wait)."""
        return self.num_samples // (self.batch_size * self.world_size)

    def _pass_len(self) -> int:
        return (self.num_samples - self.start) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start, self.consumed = epoch, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "position": self.consumed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "num_samples": self.num_samples,
                "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        if sd["num_samples"] != self.num_samples or sd["seed"] != self.seed:
            raise DataError(f"{self.what} state is for {sd['num_samples']} images and seed {sd['seed']}, this loader "
                            f"has {self.num_samples} and {self.seed}: the data set or seed changed since the checkpoint")
        self.epoch = int(sd["epoch"])
        if (sd["world_size"], sd["batch_size"]) == (self.world_size, self.batch_size):
            self.start, self.consumed = int(sd["start"]), int(sd["position"])
        else:  # the same global sample position, re-split over this run's ranks
            self.start = int(sd["start"]) + int(sd["position"]) * sd["batch_size"] * sd["world_size"]
            self.consumed = 0

    def pass_batches(self) -> np.ndarray:
        """This rank's remaining batches [L, B] of sample ids in this pass of the epoch (a finished epoch runs
        again unless set_epoch moved on)."""
        if self.consumed >= self._pass_len():
            self.start, self.consumed = 0, 0
        return epoch_batches(self.num_samples, self.batch_size, self.world_size, self.rank, self.seed, self.epoch,
                             self.start)
