"""The pre-training loader: one DALI graph for GPU and CPU, and the held-out evaluation loader.

    list file ─> external_source (this rank's ids for (epoch, iteration); files read by threads) ─┐
    shards ────> readers.webdataset (jpg + int64 id; shard rotated per epoch, buffer shuffle) ────┤
      decode ("mixed" on GPU, "cpu" without CUDA) ─┬─> view 1: RRC, colour jitter, rotation, RandAugment, flip, normalise
                                                   └─> view 2: the same ops, their own random draws
    ids ─> labels [B, C] (CSR table -> padded [B, K] -> scatter on the device) and SimMIM masks [B, Hp, Wp]

Sampling, seeding and resume: see hvpmtl/data/loader.py and docs/DATA.md.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from hvpmtl.config import DataConfig
from hvpmtl.data import augment
from hvpmtl.data.issues import DataError
from hvpmtl.data.labels import LabelTable
from hvpmtl.data.loader import EpochLoader, EvalLoader, to_device
from hvpmtl.data.masks import SimMIMMaskGenerator
from hvpmtl.data.tencent import read_dictionary
from hvpmtl.data.validate import prepare_list, prepare_shards


class PretrainLoader(EpochLoader):
    """`iter()` yields one epoch of {"view1", "view2": [B,3,H,W] dtype, "mask": [B,Hp,Wp] bool,
    "labels": [B,C] float32, "index": [B] int64 sample ids in [0, num_samples)}, on the GPU when
    DALI runs there, else on the CPU."""

    output_names = ("view1", "view2")

    def __init__(self, cfg: DataConfig, *, patch_size: int, **kw):
        self.cfg = cfg
        super().__init__(device=cfg.device, num_threads=cfg.num_threads, **kw)
        self.mask_gen = SimMIMMaskGenerator(cfg.img_size, cfg.mask_patch_size, patch_size, cfg.mask_ratio)
        self.table = LabelTable(self.labels, cfg.num_classes, cfg.label_threshold)

    def _views(self, images) -> tuple:
        return (augment.pretrain_view(images, self.cfg, half=self.half),
                augment.pretrain_view(images, self.cfg, half=self.half))

    def _finish(self, out: dict, ids: torch.Tensor) -> dict:
        return {"view1": to_device(out["view1"], self.device, self.dtype),
                "view2": to_device(out["view2"], self.device, self.dtype),
                "mask": to_device(self.mask_gen(ids.numpy(), self.seed, self.epoch), self.device),
                "labels": self.table.dense(ids, self.device),
                "index": to_device(ids, self.device)}


def _check_dictionary(cfg: DataConfig) -> None:
    if cfg.dictionary:
        n = len(read_dictionary(cfg.dictionary))
        if n != cfg.num_classes:
            raise DataError(f"data.num_classes is {cfg.num_classes} but {cfg.dictionary} lists {n} classes")


def _scan_workers() -> int:
    return min(32, 4 * (os.cpu_count() or 1))


def build_pretrain_loader(cfg: DataConfig, *, batch_size: int, patch_size: int, rank: int, world_size: int,
                          local_rank: int, seed: int, dtype=torch.float32) -> PretrainLoader:
    """The pre-training loader for data.format tencent | synthetic (list files) or shards.

    A data set with bad samples is refused (DataError with file:line of the first ones and how to
    fix it) unless data.skip_list names the validator's skip list or data.skip_corrupt is true.
    """
    common = dict(batch_size=batch_size, patch_size=patch_size, rank=rank, world_size=world_size,
                  local_rank=local_rank, seed=seed, dtype=dtype)
    _check_dictionary(cfg)
    if cfg.format == "shards":
        if not cfg.shards:
            raise DataError("data.format is 'shards' but data.shards (the shard folder) is empty")
        sh = prepare_shards(cfg.shards, num_classes=cfg.num_classes, skip_corrupt=cfg.skip_corrupt,
                            skip_list=cfg.skip_list)
        return PretrainLoader(cfg, labels=sh.labels, root="", shards=sh, skipped=sh.skipped, **common)
    if cfg.format not in ("tencent", "synthetic"):
        raise DataError(f"data.format '{cfg.format}' has no pre-training loader (use tencent, synthetic or shards)")
    if not cfg.list_file:
        raise DataError("data.list_file is empty: point it at a Tencent-format list file "
                        "(`hvpmtl data make-synthetic` writes one)")
    labels, skipped = prepare_list(cfg.list_file, cfg.root, num_classes=cfg.num_classes,
                                   skip_corrupt=cfg.skip_corrupt, skip_list=cfg.skip_list, workers=_scan_workers())
    return PretrainLoader(cfg, labels=labels, root=cfg.root, skipped=skipped, **common)


def build_eval_loader(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, local_rank: int,
                      list_file: Optional[str] = None, dtype=torch.float32) -> EvalLoader:
    """The held-out split (data.holdout_list unless `list_file`): single-view, resized and
    centre-cropped batches {"image", "labels", "index"}; every sample once over all ranks."""
    _check_dictionary(cfg)
    lst = list_file or cfg.holdout_list
    if not lst:
        raise DataError("no held-out list: set data.holdout_list (`hvpmtl data make-synthetic --holdout N` writes one)")
    labels, skipped = prepare_list(lst, cfg.root, num_classes=cfg.num_classes, skip_corrupt=cfg.skip_corrupt,
                                   skip_list=cfg.skip_list, workers=_scan_workers())
    return EvalLoader(labels=labels, root=cfg.root, batch_size=batch_size, rank=rank, world_size=world_size,
                      local_rank=local_rank, img_size=cfg.img_size, device=cfg.device, num_threads=cfg.num_threads,
                      dtype=dtype, table=LabelTable(labels, cfg.num_classes, cfg.label_threshold), skipped=skipped)
