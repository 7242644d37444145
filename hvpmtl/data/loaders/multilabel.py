"""Multi-label list data (the pre-training's list format: `path idx:conf ...`) on DALI, for fine-tuning.

The downstream multi-label set (COCO- or VOC-style classification, a held-out part of ML-Images) as a
train list and a val list under one image root. Each list is read through its own data index (built
once per node beside the list when missing and small, as for pre-training: hvpmtl/data/loaders/prepare.py), so
start-up reads no image and bad rows are refused with file:line. Training: one view
(augment.multilabel_view: the evaluation's scale, a random crop position, flip), a global reshuffle per
epoch, the last partial batch dropped, the pre-training loader's resumable state. Evaluation: resize +
centre crop, every image once.
Batches: {"image": [B,3,S,S], "labels": [B,C] float32 (confidences, or multi-hot >= threshold), "index": [B]}.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from hvpmtl.data.formats.dictionary import read_dictionary
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.loaders import augment
from hvpmtl.data.loaders.dali_loader import EpochLoader, EvalLoader, to_device
from hvpmtl.data.loaders.labels import LabelTable
from hvpmtl.data.loaders.prepare import IndexOptions, prepare_list


class MultiLabelTrainLoader(EpochLoader):
    output_names = ("image",)

    def __init__(self, *, table: LabelTable, img_size: int, **kw):
        self.table, self.img_size = table, img_size
        super().__init__(**kw)

    def _views(self, images) -> tuple:
        return (augment.multilabel_view(images, self.img_size, half=self.half),)

    def _finish(self, out: dict, ids: torch.Tensor) -> dict:
        return {"image": to_device(out["image"], self.device, self.dtype),
                "labels": self.table.dense(ids, self.device), "index": to_device(ids, self.device)}


def class_names(dictionary: str, num_classes: int) -> list[str]:
    """The dictionary's class names (it must list exactly num_classes, unless that is 0: as many as it lists),
    or "0".."C-1" without one."""
    if not dictionary:
        return [str(i) for i in range(num_classes)]
    names = read_dictionary(dictionary).names
    if num_classes and len(names) != num_classes:
        raise DataError(f"model.num_classes is {num_classes} but {dictionary} lists {len(names)} classes")
    return list(names)


def build_multilabel_loader(list_file: str, root: str, *, num_classes: int, batch_size: int, img_size: int,
                            train: bool, rank: int = 0, world_size: int = 1, seed: int = 0, device: str = "auto",
                            num_threads: int = 2, local_rank: int = 0, dtype=torch.float32,
                            label_threshold: Optional[float] = None, skip_corrupt: bool = False, skip_list: str = "",
                            log: Optional[Callable[[str], None]] = None, allow_outside_root: bool = False):
    """A loader over one list file. train=True: MultiLabelTrainLoader (set_epoch, state_dict/load_state_dict,
    len = batches per rank with the remainder dropped); train=False: EvalLoader over every image once.
    Bad rows (unreadable, class index >= num_classes, ...) are refused naming file:line unless skip_list names
    them or skip_corrupt leaves them out; `loader.skipped` counts what was left out."""
    opt = IndexOptions(builder=local_rank == 0, log=log or (lambda m: print(f"[hvpmtl] {m}", flush=True)))
    data = prepare_list(list_file, root, num_classes=num_classes, skip_corrupt=skip_corrupt, skip_list=skip_list,
                        index=opt)
    try:
        table = LabelTable(data.samples, num_classes, label_threshold)
    except ValueError as e:  # a class index the model has no output for
        raise DataError(f"{e} (model.num_classes)") from None
    common = dict(data=data, root=root, batch_size=batch_size, rank=rank, world_size=world_size,
                  local_rank=local_rank, device=device, num_threads=num_threads, dtype=dtype,
                  skip_corrupt=skip_corrupt, allow_outside_root=allow_outside_root)
    if train:
        return MultiLabelTrainLoader(table=table, img_size=img_size, seed=seed, **common)
    return EvalLoader(img_size=img_size, table=table, **common)
