"""The dense tasks' annotations of a synthetic scene (no file written here): COCO instances (one per object,
category = its shape) and ADE20K-style label maps. The data set: synthetic.py."""
from __future__ import annotations

import numpy as np
from contourpy import FillType, contour_generator

from hvpmtl.data.tools.synthetic_scenes import CLASSES, SHAPES

# category id of each shape: not contiguous, as real COCO's ids are (1..90 with gaps), so readers must map them
COCO_CATEGORY_IDS = dict(zip(SHAPES, [1, 2, 3, 5, 8, 13, 21, 34]))


def coco_categories() -> list[dict]:
    parent = dict(CLASSES)
    return [{"id": COCO_CATEGORY_IDS[s], "name": s, "supercategory": parent[s]} for s in SHAPES]


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO [x, y, w, h] of the pixels of a bool mask (pixel edges: a single pixel at (x, y) is [x, y, 1, 1])."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """The corners of a closed ring of points (the first not repeated at the end)."""
    d_in = ring - np.roll(ring, 1, axis=0)
    d_out = np.roll(ring, -1, axis=0) - ring
    return ring[np.abs(d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]) > 1e-9]


def mask_to_segmentation(mask: np.ndarray) -> list[list[float]] | dict:
    """COCO `segmentation` of a bool (h, w) mask: polygons (one per connected part), or uncompressed RLE
    where the mask has a hole (a ring), which COCO's polygons cannot represent.

    The polygons are the level-0.5 contour of the mask (contourpy), with pixel (x, y) centred at
    (x + 0.5, y + 0.5): the contour then runs along the pixel edges and cuts each staircase step through its
    middle, so pycocotools rasterises it back to the very same pixels.
    """
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    y0, x0 = max(int(ys.min()) - 1, 0), max(int(xs.min()) - 1, 0)
    crop = np.pad(mask[y0:ys.max() + 2, x0:xs.max() + 2], 1)  # a zero border closes every contour
    points, offsets = contour_generator(z=crop.astype(np.float64), fill_type=FillType.OuterOffset).filled(0.5, 2.0)
    if any(len(o) > 2 for o in offsets):  # an outer boundary with holes
        flat = np.asfortranarray(mask).ravel(order="F")
        edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        return {"size": [h, w], "counts": [0] + counts if flat[0] else counts}  # runs start with background
    polys = []
    for pts, off in zip(points, offsets):
        ring = _drop_collinear(pts[off[0]:off[1] - 1]) + np.array([x0 - 0.5, y0 - 0.5])  # border and centre shift
        polys.append([round(float(v), 2) for v in ring.ravel()])
    return polys


def coco_annotation(mask: np.ndarray, ann_id: int, image_id: int, shape: str) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[shape],
            "segmentation": mask_to_segmentation(mask), "area": float(mask.sum()), "bbox": mask_bbox(mask),
            "iscrowd": 0}


def label_map(objects: list[dict], masks: np.ndarray) -> np.ndarray:
    """(h, w) uint8: 0 background ("other", ignored by ADE20K's protocol), k = 1..8 the shape SHAPES[k - 1]."""
    out = np.zeros(masks.shape[1:], np.uint8)
    for o, m in zip(objects, masks):
        out[m] = SHAPES.index(o["shape"]) + 1
    return out
