"""ADE20K loaders: mmseg's training recipe with resumable state, and an evaluation pass over every image once.

Training (mmseg `configs/_base_/datasets/ade20k.py`): RandomResize(scale=(2048, 512), ratio_range=(0.5,
2.0), keep_ratio) -> RandomCrop(crop, cat_max_ratio=0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion
-> normalise (the pre-training's mean/std, hvpmtl.data.loaders.augment) -> pad to the crop (image 0 after
normalising, label 255), as mmseg's SegDataPreProcessor. Images resize bilinear (PIL, which
antialiases when shrinking; mmseg's cv2 does not), labels nearest. Photometric distortion follows
mmseg's draws and arithmetic (additive brightness +-32, multiplicative contrast 0.5-1.5 before or after
the HSV steps, saturation x0.5-1.5, hue +-18 on OpenCV's 180-step circle), HSV through PIL (256 steps:
the hue shift is scaled).

Order and randomness: epoch e's batches are `hvpmtl.data.loaders.order.epoch_batches` (the permutation
default_rng([seed, e]), rank r takes its slice of each global batch: ranks disjoint); each sample's
augmentation draws come from default_rng([seed, e, sample id]), nothing global. So a loader restored
from `state_dict()` yields exactly the batches, pixels included, that an uninterrupted one would, and a
resume on another world size or batch size continues from the same global sample with the same draws.

Decoding and augmentation run in a small thread pool (PIL and numpy release the GIL), `prefetch`
batches ahead.

Evaluation: rank r takes images r, r+W, r+2W, ... (every image exactly once over all ranks; ranks may
differ by one batch), resized so the short side is `short_side` (optionally capped so the long side is
at most `max_long_side`: mmseg's test Resize(scale=(2048, 512), keep_ratio=True) is short_side=512,
max_long_side=2048), normalised, zero-padded on the bottom/right to the batch's largest. Labels are
kept at their original size: the batch holds each image's resized size and its original label, and
`hvpmtl.seg_metrics.batch_confusion` cuts each image's logits to its size and resizes them to its label
(mmseg's protocol). With batch_size 1 no padding ever reaches the model.
"""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from hvpmtl.data.formats.ade20k import IGNORE_INDEX, Ade20kSplit
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.loaders.augment import IMAGENET_MEAN, IMAGENET_STD
from hvpmtl.data.loaders.order import SampleOrder

MEAN = np.asarray(IMAGENET_MEAN, np.float32)
STD = np.asarray(IMAGENET_STD, np.float32)
CROP_TRIES = 10  # mmseg RandomCrop's attempts to satisfy cat_max_ratio
AUG_STREAM = 1  # keeps these draws apart from any other use of (seed, epoch, id)

Size = Union[int, Sequence[int]]


def _hw(v: Size, what: str) -> tuple[int, int]:
    h, w = (v, v) if isinstance(v, int) else tuple(v)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"{what} must be positive, got {v}")
    return int(h), int(w)


def rescale_size(h: int, w: int, long_max: float, short_max: float) -> tuple[int, int]:
    """mmcv.imrescale's size: the largest (h, w) with the aspect kept, long side <= long_max and short side
    <= short_max (rounded half up)."""
    f = min(long_max / max(h, w), short_max / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


def resize_pair(img: np.ndarray, label: Optional[np.ndarray], h: int, w: int):
    """Image bilinear, label nearest (class indices must not blend)."""
    out = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    lab = None if label is None else np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return out, lab


def random_crop_box(label: np.ndarray, crop: tuple[int, int], rng: np.random.Generator,
                    cat_max_ratio: float) -> tuple[int, int, int, int]:
    """mmseg RandomCrop: (y1, y2, x1, x2); up to 10 draws until no class covers cat_max_ratio or more of
    the crop's labelled pixels (and it holds two classes); the last draw is kept otherwise."""
    H, W = label.shape

    def draw():
        y = int(rng.integers(0, max(H - crop[0], 0) + 1))
        x = int(rng.integers(0, max(W - crop[1], 0) + 1))
        return y, min(y + crop[0], H), x, min(x + crop[1], W)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            values, counts = np.unique(label[box[0]:box[1], box[2]:box[3]], return_counts=True)
            counts = counts[values != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg PhotoMetricDistortion on uint8 RGB: each step with probability 1/2, contrast first or last."""

    def convert(a, alpha=1.0, beta=0.0):
        return np.clip(a.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(a):
        return convert(a, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else a

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    sat = rng.uniform(*saturation_range) if rng.integers(2) else None
    hue = int(rng.integers(-hue_delta, hue_delta + 1)) if rng.integers(2) else None  # OpenCV steps, 180 = 360°
    if sat is not None or hue is not None:
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        if sat is not None:
            hsv[..., 1] = convert(hsv[..., 1], alpha=sat)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + round(hue * 256 / 180)) % 256
        img = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if mode == 0:
        img = contrast(img)
    return img


def normalize(img: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 with the pre-training's mean and std."""
    return torch.from_numpy(np.ascontiguousarray(((img.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)))


def pad_to(image: torch.Tensor, label: Optional[torch.Tensor], h: int, w: int):
    """Bottom/right padding: image 0 (after normalising: the mean colour), label 255."""
    ph, pw = h - image.shape[-2], w - image.shape[-1]
    if ph or pw:
        image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)
        if label is not None:
            label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
    return image, label


class SegTrainLoader(SampleOrder):
    """Training batches {"image": float32 [B,3,h,w], "label": int64 [B,h,w] (255 = ignore), "index": int64 [B]}
    with (h, w) = crop_size; the project's loader interface (set_epoch, __len__, __iter__, state_dict,
    load_state_dict). `scale` is mmseg's base (long, short) size; the random ratio is `ratio_range`."""

    what = "ADE20K loader"

    def __init__(self, split: Ade20kSplit, batch_size: int, crop_size: Size, rank: int, world_size: int, seed: int,
                 *, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip_prob: float = 0.5, photometric: bool = True,
                 num_threads: int = 2, prefetch: int = 2):
        if len(scale) != 2 or min(scale) < 1:
            raise ValueError(f"scale is the base (long, short) size in pixels, e.g. (2048, 512), got {tuple(scale)}; "
                             "the random factor is ratio_range")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {tuple(ratio_range)}")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        super().__init__(split, batch_size, rank, world_size, seed, lambda: split.describe())
        self.split = split
        self.crop = _hw(crop_size, "crop_size")
        self.scale, self.ratio_range = (float(max(scale)), float(min(scale))), tuple(float(r) for r in ratio_range)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.prefetch = max(1, prefetch)
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_threads), thread_name_prefix="hvpmtl-ade")

    def __iter__(self):
        epoch = self.epoch
        batches = self.pass_batches()
        queue: collections.deque = collections.deque()
        nxt = self.consumed
        while self.consumed < len(batches):
            while nxt < len(batches) and len(queue) < self.prefetch:
                queue.append([self._pool.submit(self.sample, int(i), epoch) for i in batches[nxt]])
                nxt += 1
            futures = queue.popleft()
            samples = [f.result() for f in futures]
            self.consumed += 1
            yield {"image": torch.stack([s[0] for s in samples]), "label": torch.stack([s[1] for s in samples]),
                   "index": torch.from_numpy(np.asarray(batches[self.consumed - 1], np.int64))}

    def sample(self, i: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image i's training view in `epoch`: ([3, h, w] float32, [h, w] int64), a function of (seed, epoch, i)."""
        rng = np.random.default_rng([self.seed, epoch, i, AUG_STREAM])
        img, label = self.split.load(i)
        ratio = rng.uniform(*self.ratio_range)
        h, w = rescale_size(*label.shape, self.scale[0] * ratio, self.scale[1] * ratio)
        img, label = resize_pair(img, label, h, w)
        y1, y2, x1, x2 = random_crop_box(label, self.crop, rng, self.cat_max_ratio)
        img, label = img[y1:y2, x1:x2], label[y1:y2, x1:x2]
        if rng.random() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(np.ascontiguousarray(img), rng)
        image, lab = pad_to(normalize(img), torch.from_numpy(label.astype(np.int64)), *self.crop)
        return image, lab

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class SegEvalLoader:
    """Evaluation batches {"image": float32 [B,3,H,W] (zero-padded to the batch's largest), "size": int64 [B,2]
    (each image's resized (h, w)), "label": list of B int64 [h0, w0] original-size labels (255 = ignore),
    "index": int64 [B]}; every image exactly once over all ranks."""

    def __init__(self, split: Ade20kSplit, batch_size: int, rank: int, world_size: int, short_side: int = 512, *,
                 max_long_side: Optional[int] = None, num_threads: int = 2):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if short_side < 1 or (max_long_side is not None and max_long_side < short_side):
            raise ValueError(f"short_side {short_side} must be positive and at most max_long_side {max_long_side}")
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.short_side, self.max_long_side, self.num_threads = short_side, max_long_side, num_threads
        ids = np.arange(rank, len(split), world_size)
        self.batches = [ids[k:k + batch_size] for k in range(0, len(ids), batch_size)]

    def __len__(self) -> int:
        """Batches on this rank (ranks may differ by one)."""
        return len(self.batches)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        long_max = float("inf") if self.max_long_side is None else self.max_long_side
        return rescale_size(h, w, long_max, self.short_side)

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, label = self.split.load(i)
        img, _ = resize_pair(img, None, *self.resized_size(*label.shape))
        return normalize(img), torch.from_numpy(label.astype(np.int64))

    def __iter__(self):
        with ThreadPoolExecutor(max_workers=max(1, self.num_threads), thread_name_prefix="hvpmtl-ade-eval") as pool:
            for ids in self.batches:
                samples = list(pool.map(self.sample, (int(i) for i in ids)))
                H = max(s[0].shape[1] for s in samples)
                W = max(s[0].shape[2] for s in samples)
                yield {"image": torch.stack([pad_to(s[0], None, H, W)[0] for s in samples]),
                       "size": torch.tensor([tuple(s[0].shape[1:]) for s in samples], dtype=torch.int64),
                       "label": [s[1] for s in samples], "index": torch.from_numpy(ids.astype(np.int64))}
