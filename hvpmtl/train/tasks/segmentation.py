"""Semantic segmentation fine-tuning (the paper's ADE20K protocol): UperNet on the backbone's four levels
(hvpmtl/models/segmenter.py), the ADEChallengeData2016 layout under data.root (hvpmtl/data/formats/ade20k.py), mmseg's
training pipeline (random rescale of data.base_size by data.scale_range, data.crop_size crops, flip,
photometric), pixel cross-entropy ignoring label 255 (+ model.aux_weight x the auxiliary FCN head's), and
mIoU / mAcc / aAcc from one confusion matrix summed over every rank (exact integers), whole-image or
sliding-window (data.test_mode) at the short side data.base_size[1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hvpmtl.config import ConfigError
from hvpmtl.train.tasks.base import FinetuneTask, backbone_param_groups, load_pyramid_init

IGNORE = 255


def class_names(root: str, num_classes: int) -> list[str]:
    """<root>/classes.txt (one name a line, label order: what make-synthetic --ade20k writes), or
    ADE20K's objectInfo150.txt (its Name column), else class_<k>."""
    names = []
    listed, info = Path(root) / "classes.txt", Path(root) / "objectInfo150.txt"
    if listed.is_file():
        names = [n.strip() for n in listed.read_text(encoding="utf-8", errors="replace").splitlines() if n.strip()]
    elif info.is_file():
        rows = info.read_text(encoding="utf-8", errors="replace").splitlines()[1:]
        names = [r.split("\t")[-1].split(";")[0].strip() for r in rows if r.strip()]
    if len(names) != num_classes:
        names = [f"class_{k}" for k in range(num_classes)]
    return names


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (label 255, ignored: black), for the panels."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 256, size=(256, 3), dtype=np.uint8)
    colours[IGNORE] = 0
    return colours


class SegmentationTask(FinetuneTask):
    metric = "eval/mIoU"

    def describe(self) -> str:
        d = self.cfg.data
        return (f"{self.num_classes} classes (segmentation, UperNet, {d.crop_size}-px crops, "
                f"{d.test_mode} evaluation)")

    def build_loaders(self) -> None:
        from hvpmtl.data.formats.ade20k import read_ade20k
        from hvpmtl.data.loaders.ade20k import SegEvalLoader, SegTrainLoader

        d, o = self.cfg.data, self.cfg.optim
        self.num_classes = d.num_classes or self.cfg.model.num_classes
        train = read_ade20k(d.root, "training", self.num_classes)
        val = read_ade20k(d.root, "validation", self.num_classes)
        self.val_split = val
        self.loader = SegTrainLoader(train, o.micro_batch_size, d.crop_size, self.rank, self.world, d.seed,
                                     scale=tuple(d.base_size), ratio_range=tuple(d.scale_range),
                                     num_threads=d.num_threads)
        # batch 1 as mmseg: no padding beside a sliding window; the short side of the training's base size
        self.val_loader = SegEvalLoader(val, 1, self.rank, self.world, short_side=min(d.base_size),
                                        max_long_side=max(d.base_size), num_threads=d.num_threads)
        self.classes = class_names(d.root, self.num_classes)
        self.log(f"data: {train.describe()}; {val.describe()}")

    def build_model(self) -> nn.Module:
        from hvpmtl.models.segmenter import build_upernet

        m = self.cfg.model
        model = build_upernet(m.backbone, self.num_classes, img_size=m.img_size, drop_path_rate=m.drop_path_rate,
                              decoder_channels=m.decoder_channels, aux_head=m.aux_head)
        load_pyramid_init(model.pyramid, self.cfg, self.log)
        if self.world > 1 and self.device.type == "cuda":  # mmseg's SyncBN: a few crops per GPU
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif self.cfg.optim.micro_batch_size < 2:
            raise ConfigError("optim.micro_batch_size: segmentation needs >= 2 crops per rank here (the decoder's "
                              "BatchNorm; SyncBatchNorm across ranks only on GPUs)")
        return model.to(self.device)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        return backbone_param_groups(model, model.pyramid.body, self.cfg, lr)

    def loss(self, engine, batch) -> tuple[torch.Tensor, dict]:
        x = batch["image"].to(self.device, self.input_dtype, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        logits, aux = engine(x, with_aux=True)
        main = F.cross_entropy(logits.float(), y, ignore_index=IGNORE)
        if aux is None:
            return main, {}
        aux_loss = F.cross_entropy(aux.float(), y, ignore_index=IGNORE)
        return main + self.cfg.model.aux_weight * aux_loss, {"seg": main.detach(), "aux": aux_loss.detach()}

    def _logits(self, model, image: torch.Tensor) -> torch.Tensor:
        from hvpmtl.seg_metrics import slide_inference, whole_inference

        d = self.cfg.data
        if d.test_mode == "slide":
            return slide_inference(model, image, self.num_classes, d.crop_size, d.slide_stride)
        return whole_inference(model, image, self.num_classes)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from hvpmtl.seg_metrics import batch_confusion, seg_scores, sum_over_ranks

        cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)
        for batch in self.val_loader:  # ranks may differ by one image: no collective inside the loop
            logits = self._logits(model, batch["image"].to(self.device, self.input_dtype))
            cm += batch_confusion(logits, batch["size"], batch["label"], self.num_classes)
        scores = seg_scores(sum_over_ranks(cm))
        return {f"eval/{k}": float(v) for k, v in scores.items()}

    @torch.no_grad()
    def panel(self, model: nn.Module, count: int = 4) -> np.ndarray | None:
        """Rows of (image, true labels, prediction), colour-coded, for the first validation images."""
        from hvpmtl.data.loaders.ade20k import SegEvalLoader
        from hvpmtl.seg_metrics import resize_logits

        loader = SegEvalLoader(self.val_split, 1, 0, 1, short_side=self.val_loader.short_side,
                               max_long_side=self.val_loader.max_long_side, num_threads=1)
        colours, rows = palette(self.num_classes), []
        for i, batch in zip(range(count), loader):
            h, w = (int(v) for v in batch["size"][0])
            logits = self._logits(model, batch["image"].to(self.device, self.input_dtype))[:, :, :h, :w]
            label = batch["label"][0].numpy()
            pred = resize_logits(logits, label.shape).argmax(1)[0].cpu().numpy()
            image = self.val_split.read_image(int(batch["index"][0]))
            rows.append(np.concatenate([image[..., :3], colours[label.clip(0, 255)], colours[pred]], axis=1))
        if not rows:
            return None
        width = max(r.shape[1] for r in rows)
        return np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows])

    def export_metadata(self) -> dict[str, str]:
        return {"model": "upernet", "aux_head": str(self.cfg.model.aux_head).lower()}
