"""COCO box / mask AP of detector outputs, by pycocotools' COCOeval.

    results = to_coco_results(model_outputs, image_ids, split.category_ids)   # per rank
    results = gather_results(results, world_size)                             # every rank: all of them
    metrics = coco_ap(split.coco, results)      # {"bbox_AP": 41.2, ..., "segm_APl": ...} in percent

Names: bbox_AP, bbox_AP50, bbox_AP75, bbox_APs, bbox_APm, bbox_APl (COCOeval stats[0..5]) and the
same with segm_. A size range without any ground-truth object (COCOeval's -1) is NaN; no results at
all give 0.0 everywhere.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
MASK_THRESHOLD = 0.5


def metric_names(iou_types: Sequence[str] = IOU_TYPES) -> list[str]:
    return [f"{t}_{s}" for t in iou_types for s in STAT_NAMES]


def to_coco_results(outputs: Sequence[dict], image_ids: Sequence[int], category_ids: Sequence[int]) -> list[dict]:
    """COCO result dicts from torchvision detector outputs (eval mode: boxes xyxy at the original image
    size, labels 1..K, scores, optional masks [n,1,H,W] probabilities at the original size).

    Boxes become [x, y, w, h]; label l becomes category_ids[l - 1]; masks are thresholded at 0.5 and
    RLE-encoded (counts as str, JSON-safe)."""
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs for {len(image_ids)} image ids")
    cats = list(category_ids)
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().to("cpu", torch.float64).numpy()
        labels = out["labels"].detach().cpu().numpy()
        scores = out["scores"].detach().to("cpu", torch.float64).numpy()
        if len(labels) and (labels.min() < 1 or labels.max() > len(cats)):
            raise ValueError(f"image {image_id}: labels must be in 1..{len(cats)} (0 is the background), got "
                             f"{sorted(set(labels.tolist()))[:10]}")
        rles = None
        if "masks" in out:
            m = out["masks"].detach().cpu()
            if m.dim() == 4:
                m = m[:, 0]
            binary = (m >= MASK_THRESHOLD).numpy().astype(np.uint8)  # [n, H, W]
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for j in range(len(labels)):
            x1, y1, x2, y2 = boxes[j]
            r = {"image_id": int(image_id), "category_id": int(cats[int(labels[j]) - 1]),
                 "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(scores[j])}
            if rles is not None:
                rle = rles[j]
                r["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            results.append(r)
    return results


def gather_results(results: list[dict], world_size: int) -> list[dict]:
    """All ranks' results on every rank, in rank order (torch.distributed.all_gather_object when
    world_size > 1; the process group must be up)."""
    if world_size <= 1:
        return list(results)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"gather_results: world_size {world_size} but no torch.distributed process group")
    parts: list = [None] * world_size
    dist.all_gather_object(parts, list(results))
    return [r for part in parts for r in part]


def _evaluate(coco_gt: COCO, results: list[dict], iou_type: str) -> np.ndarray:
    if iou_type == "segm":
        if any("segmentation" not in r for r in results):
            raise ValueError("segm AP needs a 'segmentation' in every result (outputs without masks?)")
        # without a bbox, loadRes takes the area (for APs/m/l) and the box from the mask, as COCO does
        dts = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    else:
        dts = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    unknown = sorted({r["image_id"] for r in dts} - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"results name {len(unknown)} image ids not in the ground truth, e.g. {unknown[:5]}")
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval and loadRes print their progress
        coco_dt = coco_gt.loadRes(copy.deepcopy(dts))
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:6], np.float64)


def coco_ap(coco_gt: COCO, results: list[dict], iou_types: Sequence[str] = IOU_TYPES) -> dict[str, float]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl in percent for each IoU type ('bbox', 'segm')."""
    out = {}
    for t in iou_types:
        if t not in IOU_TYPES:
            raise ValueError(f"iou type '{t}': one of {IOU_TYPES}")
        stats = np.zeros(6) if not results else _evaluate(coco_gt, results, t)
        for name, v in zip(STAT_NAMES, stats):
            out[f"{t}_{name}"] = float("nan") if v < 0 else float(v) * 100.0
    return out
