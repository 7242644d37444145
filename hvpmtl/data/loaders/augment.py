"""DALI graph pieces: decode, the pre-training view, the evaluation view, the fine-tuning views.

Call these inside a pipeline definition. `device` is "gpu" (decode on "mixed", the rest on the GPU)
or "cpu". The views take decoded HWC uint8 RGB images and return normalised CHW tensors.
"""
from __future__ import annotations

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.auto_aug import rand_augment

from hvpmtl.config import DataConfig

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
EVAL_CROP_RATIO = 0.875  # resize the shorter side to img_size / 0.875, then centre-crop img_size


def dali_dtype(half: bool):
    # DALI has no bfloat16: a half-precision request gets float16 here and is cast on the device
    return types.FLOAT16 if half else types.FLOAT


def decode(jpegs, device: str):
    if device == "gpu":
        # hw_decoder_load: share of the batch for the A100/H100 hardware JPEG decoder
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=0.7)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)


def normalize(images, *, half: bool, mirror=None):
    kw = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD, output_layout="CHW",
                                    dtype=dali_dtype(half), **kw)


def pretrain_view(images, cfg: DataConfig, *, half: bool):
    """RRC -> colour jitter -> rotation -> RandAugment -> flip + normalise (one random draw each)."""
    s = cfg.img_size
    v = fn.random_resized_crop(images, size=[s, s], random_area=list(cfg.crop_scale),
                               random_aspect_ratio=[3 / 4, 4 / 3], antialias=True)
    cj = cfg.color_jitter
    if cj > 0:
        # torchvision ColorJitter(cj, cj, cj, cj / 4): hue as a fraction of the circle, in degrees here
        v = fn.color_twist(v, brightness=fn.random.uniform(range=[max(0.0, 1 - cj), 1 + cj]),
                           contrast=fn.random.uniform(range=[max(0.0, 1 - cj), 1 + cj]),
                           saturation=fn.random.uniform(range=[max(0.0, 1 - cj), 1 + cj]),
                           hue=fn.random.uniform(range=[-90.0 * cj, 90.0 * cj]))
    if cfg.rotation_deg > 0:
        v = fn.rotate(v, angle=fn.random.uniform(range=[-cfg.rotation_deg, cfg.rotation_deg]), keep_size=True,
                      fill_value=0)
    if cfg.rand_augment_n > 0:
        v = rand_augment.rand_augment(v, n=cfg.rand_augment_n, m=cfg.rand_augment_m)
    mirror = fn.random.coin_flip(probability=0.5) if cfg.flip else None
    return normalize(v, half=half, mirror=mirror)


def _crop_at_eval_scale(images, img_size: int, pos_x, pos_y):
    """Shorter side to img_size / 0.875, then an img_size crop at (pos_x, pos_y) in [0, 1]."""
    v = fn.resize(images, resize_shorter=round(img_size / EVAL_CROP_RATIO), antialias=True)
    return fn.crop(v, crop=[img_size, img_size], crop_pos_x=pos_x, crop_pos_y=pos_y)


def eval_view(images, img_size: int, *, half: bool):
    """Shorter side to img_size / 0.875, centre crop img_size, normalise: no randomness."""
    return normalize(_crop_at_eval_scale(images, img_size, 0.5, 0.5), half=half)


def finetune_view(images, img_size: int, *, half: bool, scale=(0.08, 1.0)):
    """Fine-tuning augmentation: RRC + horizontal flip."""
    v = fn.random_resized_crop(images, size=[img_size, img_size], random_area=list(scale),
                               random_aspect_ratio=[3 / 4, 4 / 3], antialias=True)
    return normalize(v, half=half, mirror=fn.random.coin_flip(probability=0.5))


def multilabel_view(images, img_size: int, *, half: bool):
    """Multi-label fine-tuning: the evaluation view's scale with a random crop position + flip. A random
    resized crop down to 8 % of the image would cut out objects whose labels the target still holds."""
    v = _crop_at_eval_scale(images, img_size, fn.random.uniform(range=[0.0, 1.0]),
                            fn.random.uniform(range=[0.0, 1.0]))
    return normalize(v, half=half, mirror=fn.random.coin_flip(probability=0.5))
