"""The resumable position of the dense tasks' training loaders (COCO, ADE20K), which read files with PIL threads
instead of DALI: epoch e's rank-disjoint batches are hvpmtl.data.loader.epoch_batches from global sample
position `start`, of which this rank has used `consumed`. A saved position restores exactly on the same ranks
and batch size; on others the same global position is re-split over the new ranks (the draws are per sample)."""
from __future__ import annotations

import numpy as np

from hvpmtl.data.issues import DataError
from hvpmtl.data.loader import epoch_batches


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
