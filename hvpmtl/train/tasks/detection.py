"""Detection and instance segmentation fine-tuning (the paper's COCO protocol): torchvision's Mask R-CNN with
an FPN on the backbone's four levels (hvpmtl/models/detector.py), the COCO layout read with pycocotools
(data.train_ann / data.train_images, data.val_ann / data.val_images; classes from the JSON's categories,
ids need not be contiguous), flip in the loader and the multi-scale resize of the recipe in the model
(a random short side of data.min_sizes, long side at most data.max_size; data.test_size to evaluate), and
COCO box and mask AP by pycocotools' COCOeval over every rank's detections, gathered.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from hvpmtl.data.formats.issues import DataError
from hvpmtl.dist import sum_to_host
from hvpmtl.train.tasks.base import FinetuneTask, backbone_param_groups, load_pyramid_init


class DetectionTask(FinetuneTask):
    metric = "eval/bbox_AP"

    def describe(self) -> str:
        d = self.cfg.data
        return (f"{self.num_classes} categories (detection, Mask R-CNN, short side {min(d.min_sizes)}-"
                f"{max(d.min_sizes)}, max {d.max_size}, test {d.test_size})")

    def build_loaders(self) -> None:
        from hvpmtl.data.formats.coco import read_coco
        from hvpmtl.data.loaders.coco import CocoEvalLoader, CocoTrainLoader

        d, o = self.cfg.data, self.cfg.optim
        train = read_coco(d.train_ann, d.train_images)
        val = read_coco(d.val_ann, d.val_images)
        if train.category_ids != val.category_ids:
            raise DataError(f"{d.val_ann}: categories {val.category_ids[:10]} differ from {d.train_ann}'s "
                            f"{train.category_ids[:10]}: the model's classes come from the training file")
        self.val_split = val
        self.num_classes, self.classes = train.num_categories, list(train.category_names)
        self.loader = CocoTrainLoader(train, o.micro_batch_size, self.rank, self.world, d.seed, flip=True,
                                      num_threads=d.num_threads)
        self.val_loader = CocoEvalLoader(val, o.micro_batch_size, self.rank, self.world, num_threads=d.num_threads)
        for split, ann in ((train, d.train_ann), (val, d.val_ann)):
            self.log(f"data: {ann}: {len(split)} images; {split.skipped.describe()}")

    def build_model(self) -> nn.Module:
        from hvpmtl.models.detector import build_maskrcnn

        m, d = self.cfg.model, self.cfg.data
        model = build_maskrcnn(m.backbone, self.num_classes + 1, img_size=m.img_size, drop_path_rate=m.drop_path_rate,
                               min_size=tuple(d.min_sizes), max_size=d.max_size, fpn_channels=m.fpn_channels,
                               rpn_post_nms_top_n_train=m.rpn_proposals, rpn_post_nms_top_n_test=m.rpn_proposals,
                               rpn_pre_nms_top_n_train=2 * m.rpn_proposals, rpn_pre_nms_top_n_test=m.rpn_proposals,
                               box_batch_size_per_image=m.roi_samples)
        load_pyramid_init(model.backbone.body, self.cfg, self.log)
        return model.to(self.device)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        return backbone_param_groups(model, model.backbone.body.body, self.cfg, lr)

    def loss(self, engine, batch) -> tuple[torch.Tensor, dict]:
        images = [im.to(self.device, self.input_dtype, non_blocking=True) for im in batch["images"]]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
        losses = engine(images, targets)  # torchvision's five: classifier, box_reg, mask, objectness, rpn_box_reg
        total = sum(v.float() for v in losses.values())
        return total, {k.removeprefix("loss_"): v.detach().float() for k, v in losses.items()}

    def _predict(self, model, images: list[torch.Tensor]) -> list[dict]:
        """Eval-mode outputs at the evaluation scale (data.test_size), mapped back to each image's size."""
        transform = model.transform
        train_sizes = transform.min_size
        transform.min_size = (self.cfg.data.test_size,)
        try:
            return model([im.to(self.device, self.input_dtype) for im in images])
        finally:
            transform.min_size = train_sizes

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """COCOeval once, on rank 0, over every rank's detections (gathered); its figures reach every rank
        through one all-reduce (the others add zeros)."""
        from hvpmtl.coco_metrics import coco_ap, gather_results, metric_names, to_coco_results

        split = self.val_split
        results = []
        for batch in self.val_loader:
            outputs = self._predict(model, batch["images"])
            results += to_coco_results(outputs, batch["image_ids"], split.category_ids)
        results = gather_results(results, self.world)
        names = metric_names()
        values = [0.0] * len(names)
        if self.rank == 0:
            scores = coco_ap(split.coco, results)
            values = [scores[n] for n in names]
        values = sum_to_host(torch.tensor(values + [len(results) if self.rank == 0 else 0.0], dtype=torch.float64,
                                          device=self.device))
        # a size range without any object is NaN in COCOeval's terms: left out rather than logged as a number
        out = {f"eval/{n}": v for n, v in zip(names, values[:-1]) if not math.isnan(v)}
        out["eval/detections"] = values[-1]
        return out

    @torch.no_grad()
    def panel(self, model: nn.Module, count: int = 4, min_score: float = 0.5) -> np.ndarray | None:
        """The first validation images with their predicted masks (tinted) and boxes (outlined), score >= 0.5."""
        from PIL import Image, ImageDraw

        from hvpmtl.data.loaders.coco import load_image

        rows, rng = [], np.random.default_rng(0)
        colours = rng.integers(60, 256, size=(self.num_classes + 1, 3))
        for i in range(min(count, len(self.val_split))):
            image = load_image(self.val_split, i)
            out = self._predict(model, [image])[0]
            pixels = (image.permute(1, 2, 0).numpy() * 255).astype(np.float64)
            keep = out["scores"] >= min_score
            for mask, label in zip(out["masks"][keep], out["labels"][keep]):
                on = mask[0].float().cpu().numpy() >= 0.5
                pixels[on] = 0.5 * pixels[on] + 0.5 * colours[int(label)]
            canvas = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(canvas)
            for box, label, score in zip(out["boxes"][keep], out["labels"][keep], out["scores"][keep]):
                x1, y1, x2, y2 = (float(v) for v in box)
                colour = tuple(int(c) for c in colours[int(label)])
                draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
                draw.text((x1 + 2, y1 + 1), f"{self.classes[int(label) - 1]} {float(score):.2f}", fill=colour)
            rows.append(np.asarray(canvas))
        if not rows:
            return None
        width = max(r.shape[1] for r in rows)
        return np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows])

    def export_metadata(self) -> dict[str, str]:
        return {"model": "maskrcnn", "category_ids": ",".join(str(c) for c in self.val_split.category_ids)}
