"""Batches of a CocoSplit (hvpmtl.data.formats.coco) for torchvision's Mask R-CNN, with the loader interface of
hvpmtl.data.loaders.dali_loader (set_epoch, __len__, __iter__, state_dict, load_state_dict).

Images are decoded with PIL (a few threads) to float RGB CHW tensors in 0..1 at their own size: resizing,
normalisation and padding are the model's (GeneralizedRCNNTransform, hvpmtl.models.detector).

Training order is hvpmtl.data.loaders.order.epoch_batches (the permutation of (seed, epoch), rank-disjoint
batches, the last N mod (B x W) images of an epoch dropped); the flip of an image is drawn from
(seed, epoch, image position in the split), so neither depends on a global RNG, and a loader resumed
from state_dict() yields exactly the batches (pixels included) an uninterrupted one would.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hvpmtl.data.formats.coco import CocoSplit, decode_masks
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.loaders.order import SampleOrder

log = logging.getLogger(__name__)

FLIP_STREAM = 0x666C6970  # keeps the flip draws apart from other uses of (seed, epoch, i)


def load_image(split: CocoSplit, i: int) -> torch.Tensor:
    """Image i as float32 [3, H, W] in 0..1; its size must be the one the JSON gives."""
    path = split.paths[i]
    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))  # a writable copy for torch
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{split.where(i)}: cannot decode the image ({e})") from None
    if rgb.shape[:2] != (split.heights[i], split.widths[i]):
        raise DataError(f"{split.where(i)}: the file is {rgb.shape[0]}x{rgb.shape[1]} (HxW) but the JSON says "
                        f"{split.heights[i]}x{split.widths[i]}; masks and boxes would not fit it")
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)


def load_target(split: CocoSplit, i: int) -> dict:
    a = split.annotations[i]
    return {"boxes": torch.from_numpy(a.boxes.copy()).float(), "labels": torch.from_numpy(a.labels.copy()),
            "masks": torch.from_numpy(decode_masks(split, i))}


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror an image [3,H,W] and its target (xyxy boxes: x -> W - x, masks [n,H,W])."""
    w = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def flip_draw(seed: int, epoch: int, i: int) -> bool:
    return bool(np.random.default_rng([seed, epoch, i, FLIP_STREAM]).random() < 0.5)


class CocoTrainLoader(SampleOrder):
    """Yields {"images": [float [3,H,W] in 0..1], "targets": [{"boxes" [n,4] xyxy float32, "labels" [n] int64
    in 1..K, "masks" [n,H,W] uint8}], "image_ids": [int]} of `batch_size` images, rank-disjoint."""

    what = "COCO loader"

    def __init__(self, split: CocoSplit, batch_size: int, rank: int, world_size: int, seed: int, flip: bool = True,
                 num_threads: int = 2):
        super().__init__(split, batch_size, rank, world_size, seed, lambda: split.ann_file)
        self.split, self.flip, self.num_threads = split, flip, num_threads

    def _sample(self, i: int) -> tuple[torch.Tensor, dict]:
        image, target = load_image(self.split, i), load_target(self.split, i)
        if self.flip and flip_draw(self.seed, self.epoch, i):
            image, target = hflip(image, target)
        return image, target

    def __iter__(self):
        batches = self.pass_batches()
        with ThreadPoolExecutor(max_workers=max(1, self.num_threads), thread_name_prefix="hvpmtl-coco") as pool:
            while self.consumed < len(batches):
                ids = [int(i) for i in batches[self.consumed]]
                samples = list(pool.map(self._sample, ids))
                self.consumed += 1
                yield {"images": [s[0] for s in samples], "targets": [s[1] for s in samples],
                       "image_ids": [self.split.image_ids[i] for i in ids]}


class CocoEvalLoader:
    """Every image exactly once over all ranks, no augmentation: rank r takes images r, r+W, r+2W, ...
    in batches of `batch_size` with a partial last one (ranks may differ by one batch). Yields
    {"images": [float [3,H,W] in 0..1], "image_ids": [int]}."""

    def __init__(self, split: CocoSplit, batch_size: int, rank: int, world_size: int, num_threads: int = 2):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.num_threads = num_threads
        ids = np.arange(rank, len(split), world_size)
        self.batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        self.consumed = 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:  # the same images every epoch
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"position": self.consumed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_samples": len(self.split)}

    def load_state_dict(self, sd: dict) -> None:
        same = (sd["rank"], sd["world_size"], sd["batch_size"], sd["num_samples"]) == (
            self.rank, self.world_size, self.batch_size, len(self.split))
        self.consumed = int(sd["position"]) if same else 0

    def __iter__(self):
        if self.consumed >= len(self.batches):
            self.consumed = 0
        with ThreadPoolExecutor(max_workers=max(1, self.num_threads), thread_name_prefix="hvpmtl-coco") as pool:
            while self.consumed < len(self.batches):
                ids = [int(i) for i in self.batches[self.consumed]]
                images = list(pool.map(lambda i: load_image(self.split, i), ids))
                self.consumed += 1
                yield {"images": images, "image_ids": [self.split.image_ids[i] for i in ids]}
