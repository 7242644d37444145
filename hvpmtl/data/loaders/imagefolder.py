"""Single-label ImageFolder data (root/<class>/<image>) on DALI, for fine-tuning and evaluation.

Classes are the sorted sub-folder names (torchvision's ImageFolder order). Training: one view,
random resized crop + flip, a global reshuffle per epoch, the last partial batch dropped, same
resumable state as the pre-training loader. Evaluation: resize + centre crop, every image once.
Batches: {"image": [B,3,S,S], "label": [B] int64, "index": [B] int64}.
"""
from __future__ import annotations

import numpy as np
import torch

from hvpmtl.data.loaders import augment
from hvpmtl.data.loaders.dali_loader import EpochLoader, EvalLoader, to_device
from hvpmtl.data.loaders.prepare import (IMAGE_EXTENSIONS as EXTENSIONS, prepare_imagefolder,  # noqa: F401
                                         scan_image_folder)


class ImageFolderTrainLoader(EpochLoader):
    output_names = ("image",)

    def __init__(self, *, targets: np.ndarray, classes: list[str], img_size: int, **kw):
        self.img_size, self.classes = img_size, classes
        self.targets = torch.from_numpy(targets)
        super().__init__(**kw)

    def _views(self, images) -> tuple:
        return (augment.finetune_view(images, self.img_size, half=self.half),)

    def _finish(self, out: dict, ids: torch.Tensor) -> dict:
        return {"image": to_device(out["image"], self.device, self.dtype),
                "label": to_device(self.targets[ids], self.device), "index": to_device(ids, self.device)}


def build_imagefolder_loader(root: str, batch_size: int, img_size: int, train: bool, rank: int = 0,
                             world_size: int = 1, seed: int = 0, device: str = "auto", num_threads: int = 2,
                             local_rank: int = 0, dtype=torch.float32):
    """An ImageFolder loader; `.classes` holds the class names, `.num_samples` the image count.

    train=True: ImageFolderTrainLoader (set_epoch, state_dict/load_state_dict, len = batches per
    rank with the remainder dropped). train=False: EvalLoader over every image once (ranks may
    differ by one batch).
    """
    classes, data, targets = prepare_imagefolder(root)
    if train:
        return ImageFolderTrainLoader(targets=targets, classes=classes, img_size=img_size, data=data, root=root,
                                      batch_size=batch_size, rank=rank, world_size=world_size, local_rank=local_rank,
                                      seed=seed, dtype=dtype, device=device, num_threads=num_threads,
                                      allow_outside_root=True)  # found by scanning the root: a link farm is fine
    loader = EvalLoader(data=data, root=root, batch_size=batch_size, rank=rank, world_size=world_size,
                        local_rank=local_rank, img_size=img_size, device=device, num_threads=num_threads,
                        dtype=dtype, int_labels=targets, allow_outside_root=True)
    loader.classes = classes
    return loader
