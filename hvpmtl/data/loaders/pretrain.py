"""The pre-training loader: one DALI graph for GPU and CPU, and the held-out evaluation loader.

    data index (mapped) ──> usable samples (prepare.py: skip policy, what was left out)
    list file ─> external_source (this rank's ids for (epoch, iteration); files read and header-checked by threads) ─┐
    shards ────> readers.webdataset (jpg + int64 id; shard rotated per epoch, buffer shuffle) ──────────────────────┤
      decode ("mixed" on GPU, "cpu" without CUDA) ─┬─> view 1: RRC, colour jitter, rotation, RandAugment, flip, normalise
                                                   └─> view 2: the same ops, their own random draws
    ids ─> labels [B, C] (CSR rows gathered from the index -> padded [B, K] -> scatter on the device)
           and SimMIM masks [B, Hp, Wp] (made on the device from (seed, epoch, id))

Building a loader opens no image and reads no JPEG byte; it raises DataError (never a traceback)
for data it cannot use. Sampling, seeding and resume: hvpmtl/data/loaders/order.py, dali_loader.py and docs/DATA.md.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from hvpmtl.config import DataConfig
from hvpmtl.data.formats import jpeg
from hvpmtl.data.formats.dictionary import read_dictionary
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.formats.object_store import is_s3
from hvpmtl.data.loaders import augment
from hvpmtl.data.loaders.dali_loader import EpochLoader, EvalLoader, to_device
from hvpmtl.data.loaders.labels import LabelTable
from hvpmtl.data.loaders.masks import SimMIMMaskGenerator
from hvpmtl.data.loaders.prepare import IndexOptions, Prepared, prepare_list, prepare_shards

LIST_FORMATS = ("tencent", "synthetic")


class PretrainLoader(EpochLoader):
    """`iter()` yields one epoch of {"view1", "view2": [B,3,H,W] dtype, "mask": [B,Hp,Wp] bool,
    "labels": [B,C] float32, "index": [B] int64 sample ids in [0, num_samples)}, on the GPU when
    DALI runs there, else on the CPU."""

    output_names = ("view1", "view2")

    def __init__(self, cfg: DataConfig, *, patch_size: int, **kw):
        self.cfg = cfg
        self.bucket = getattr(kw.get("data"), "bucket", None)  # issue 22: shards in a bucket (shard_cache.py)
        super().__init__(device=cfg.device, num_threads=cfg.num_threads, skip_corrupt=cfg.skip_corrupt,
                         max_pixels=_max_pixels(cfg), allow_outside_root=cfg.allow_outside_root, **kw)
        self.mask_gen = SimMIMMaskGenerator(cfg.img_size, cfg.mask_patch_size, patch_size, cfg.mask_ratio)
        try:
            self.table = LabelTable(self.labels, cfg.num_classes, cfg.label_threshold)
        except ValueError as e:
            raise DataError(str(e)) from None

    def _views(self, images) -> tuple:
        return (augment.pretrain_view(images, self.cfg, half=self.half),
                augment.pretrain_view(images, self.cfg, half=self.half))

    # -- issue 22: shards in a bucket: this epoch's paths (cached copies or s3:// URIs), and DALI's S3 errors
    # named as such (not as a decode failure) ------------------------------------------------------------------

    def _open(self) -> None:
        if self.bucket is None:
            return super()._open()
        self.shards.tars = self.bucket.paths_for(self.rank, self.world_size, self.pos.epoch)
        try:
            super()._open()
        except RuntimeError as e:
            raise self._bucket_error(e) from e

    def _next(self) -> dict:
        try:
            return super()._next()
        except DataError as e:
            if self.bucket is not None and isinstance(e.__cause__, RuntimeError) and _s3_failure(e.__cause__):
                raise self._bucket_error(e.__cause__) from e
            raise  # a decode failure: file_reader.py's message (validate --full-decode) fits it

    def _bucket_error(self, e: BaseException) -> DataError:
        said = " ".join(str(e).split())
        if not _s3_failure(e):
            return DataError(f"DALI failed while reading the shards of {self.bucket.uri}: {said[:1500]}")
        return DataError(f"reading the shards of {self.bucket.uri} from {self.bucket.store.where} failed after the "
                         "S3 client's retries (AWS_MAX_ATTEMPTS): the job stops; restarting it resumes from the last "
                         "checkpoint at its exact data position. If an object is missing, run `hvpmtl data validate "
                         f"--shards {self.bucket.uri}`.\nDALI said: {said[:1500]}")

    def _finish(self, out: dict, ids: torch.Tensor) -> dict:
        index = to_device(ids, self.device)
        return {"view1": to_device(out["view1"], self.device, self.dtype),
                "view2": to_device(out["view2"], self.device, self.dtype),
                "mask": self.mask_gen(index, self.seed, self.epoch),
                "labels": self.table.dense(ids, self.device),
                "index": index}


def _s3_failure(e: BaseException) -> bool:
    """Whether a DALI error comes from its S3 client (issue 22)."""
    return any(w in str(e) for w in ("S3", "s3://", "curl", "AWS"))


def _max_pixels(cfg: DataConfig) -> int:
    return int(getattr(cfg, "max_pixels", jpeg.DEFAULT_MAX_PIXELS))


def index_options(cfg: DataConfig, local_rank: int = 0, log: Optional[Callable[[str], None]] = None) -> IndexOptions:
    """Where data.index is and who builds a missing one: one process per node (local rank 0)."""
    return IndexOptions(path=getattr(cfg, "index", ""), auto_build_max=int(getattr(cfg, "index_auto_build", 1_000_000)),
                        wait_s=float(getattr(cfg, "index_wait_s", 600)), builder=local_rank == 0,
                        log=log or (lambda m: print(f"[hvpmtl] {m}", flush=True)))


def _check_dictionary(cfg: DataConfig) -> None:
    if cfg.dictionary:
        n = len(read_dictionary(cfg.dictionary))
        if n != cfg.num_classes:
            raise DataError(f"data.num_classes is {cfg.num_classes} but {cfg.dictionary} lists {n} classes")


def prepare_pretrain_data(cfg: DataConfig, *, local_rank: int = 0, log=None) -> Prepared:
    """The usable samples of data.format tencent | synthetic (list files) or shards, from the data index."""
    _check_dictionary(cfg)
    opt = index_options(cfg, local_rank, log)
    if cfg.format == "shards":
        if not cfg.shards:
            raise DataError("data.format is 'shards' but data.shards (the shard folder) is empty")
        if is_s3(cfg.shards):  # issue 22: a bucket prefix (hvpmtl/data/loaders/shard_cache.py)
            from hvpmtl.data.loaders.shard_cache import prepare_bucket_shards
            return prepare_bucket_shards(cfg.shards, cache_dir=cfg.cache_dir, cache_limit_gb=cfg.cache_limit_gb,
                                         num_classes=cfg.num_classes, skip_corrupt=cfg.skip_corrupt,
                                         skip_list=cfg.skip_list, max_pixels=_max_pixels(cfg), index=opt,
                                         log_fn=opt.log)
        return prepare_shards(cfg.shards, num_classes=cfg.num_classes, skip_corrupt=cfg.skip_corrupt,
                              skip_list=cfg.skip_list, max_pixels=_max_pixels(cfg), index=opt)
    if cfg.format not in LIST_FORMATS:
        raise DataError(f"data.format '{cfg.format}' has no pre-training loader (use tencent, synthetic or shards)")
    if not cfg.list_file:
        raise DataError("data.list_file is empty: point it at a Tencent-format list file "
                        "(`hvpmtl data make-synthetic` writes one)")
    return prepare_list(cfg.list_file, cfg.root, num_classes=cfg.num_classes, skip_corrupt=cfg.skip_corrupt,
                        skip_list=cfg.skip_list, max_pixels=_max_pixels(cfg), index=opt)


def build_pretrain_loader(cfg: DataConfig, *, batch_size: int, patch_size: int, rank: int, world_size: int,
                          local_rank: int, seed: int, dtype=torch.float32, log=None) -> PretrainLoader:
    """The pre-training loader for data.format tencent | synthetic (list files) or shards. Cheap: maps the
    data index, opens no image; call it before the model is built.

    A data set with known-bad samples is refused (DataError with file:line of the first ones and how
    to fix it) unless data.skip_list names the validator's skip list or data.skip_corrupt is true.
    `loader.skipped` counts what was left out and why; `loader.skipped_description()` says it.
    """
    data = prepare_pretrain_data(cfg, local_rank=local_rank, log=log)
    return PretrainLoader(cfg, data=data, root=cfg.root if cfg.format != "shards" else "", patch_size=patch_size,
                          batch_size=batch_size, rank=rank, world_size=world_size, local_rank=local_rank, seed=seed,
                          dtype=dtype)


def build_eval_loader(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, local_rank: int,
                      list_file: Optional[str] = None, dtype=torch.float32, log=None) -> EvalLoader:
    """The held-out split (data.holdout_list unless `list_file`): single-view, resized and
    centre-cropped batches {"image", "labels", "index"}; every sample once over all ranks."""
    _check_dictionary(cfg)
    lst = list_file or cfg.holdout_list
    if not lst:
        raise DataError("no held-out list: set data.holdout_list (`hvpmtl data make-synthetic --holdout N` writes one)")
    opt = index_options(cfg, local_rank, log)
    opt.path = ""  # data.index is the training set's; the held-out list has its own beside it
    data = prepare_list(lst, cfg.root, num_classes=cfg.num_classes, skip_corrupt=cfg.skip_corrupt,
                        skip_list=cfg.skip_list, max_pixels=_max_pixels(cfg), index=opt)
    try:
        table = LabelTable(data.samples, cfg.num_classes, cfg.label_threshold)
    except ValueError as e:
        raise DataError(str(e)) from None
    return EvalLoader(data=data, root=cfg.root, batch_size=batch_size, rank=rank, world_size=world_size,
                      local_rank=local_rank, img_size=cfg.img_size, device=cfg.device, num_threads=cfg.num_threads,
                      dtype=dtype, table=table, skip_corrupt=cfg.skip_corrupt, max_pixels=_max_pixels(cfg),
                      allow_outside_root=cfg.allow_outside_root)
