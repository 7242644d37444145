"""A COCO-format detection / instance-segmentation split (`instances_*.json` + an image folder).

    split = read_coco("annotations/instances_val2017.json", "val2017")

What is read, and what happens to bad input (every error a DataError naming the JSON file and the
image / annotation id or the image path; every skip counted in `split.skipped` and logged once):
  errors   not valid JSON, or no images / annotations / categories list; duplicate image, annotation
           or category ids; an image whose file is missing; an annotation for an unknown image id or
           with a category id not in `categories`; a bbox that is not 4 numbers; image sizes that are
           not positive (missing sizes are read from the file's header)
  skipped  boxes with w or h <= 0, or wholly outside the image; polygons with < 3 points (or an odd
           number of coordinates), and annotations left without any polygon; annotations without a
           segmentation (Mask R-CNN trains on masks)
  clipped  boxes reaching outside the image are clipped to it (counted)
  crowd    iscrowd=1 regions are not trained on (counted) but kept in `split.coco`, where COCOeval
           treats them as ignore regions
  kept     images without annotations (negatives in training)

`split.coco` is the ground truth for COCOeval: the split's images and the annotations training uses
(clipped boxes, skips removed, a missing `area` filled in) plus the crowd regions.
Labels: the sorted category ids map to contiguous labels 1..K (0 is the background).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from hvpmtl.data.formats.issues import DataError

log = logging.getLogger(__name__)

SHOW = 8  # problems listed in one error or summary
SKIP_REASONS = {
    "empty-box": "box with w or h <= 0",
    "box-outside": "box wholly outside the image",
    "clipped-box": "box reaching outside the image, clipped to it (kept)",
    "short-polygon": "polygon with < 3 points or an odd number of coordinates, dropped",
    "no-polygon": "annotation left without a usable polygon",
    "no-segmentation": "annotation without a segmentation",
    "crowd": "crowd region (iscrowd=1): not trained on, kept for evaluation",
}


@dataclass
class CocoSkipped:
    """What was left out or changed, by reason (SKIP_REASONS), with the first few places named."""
    counts: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= 3 and len(self.examples) < 4 * SHOW:
            self.examples.append(f"{where}: {SKIP_REASONS[reason]}")

    @property
    def annotations_left_out(self) -> int:
        """Annotations not trained on (clipped boxes and dropped polygons of kept annotations not counted)."""
        return sum(n for r, n in self.counts.items() if r not in ("clipped-box", "short-polygon"))

    def as_dict(self) -> dict:
        return dict(self.counts)

    def describe(self) -> str:
        if not self.counts:
            return "nothing skipped"
        return ", ".join(f"{n} {SKIP_REASONS[r]}" for r, n in sorted(self.counts.items()))


@dataclass
class ImageAnnotations:
    """The annotations of one image that training uses (no crowd regions)."""
    ann_ids: list[int]
    boxes: np.ndarray  # [n, 4] float32 xyxy in pixels, inside the image
    labels: np.ndarray  # [n] int64 in 1..K
    segmentations: list  # per annotation: a list of flat polygons, or an RLE dict (COCO's formats)


@dataclass
class CocoSplit:
    ann_file: Path
    image_dir: Path
    image_ids: list[int]  # ascending
    paths: list[Path]  # per image, aligned with image_ids
    heights: list[int]
    widths: list[int]
    annotations: list[ImageAnnotations]  # per image, aligned with image_ids
    category_ids: list[int]  # sorted; label l in 1..K is category_ids[l - 1]
    category_names: list[str]
    skipped: CocoSkipped
    coco: COCO  # ground truth for COCOeval (see the module docstring)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_categories(self) -> int:
        """K, the object categories."""
        return len(self.category_ids)

    @property
    def num_classes(self) -> int:
        """K + 1: the categories and the background, what build_maskrcnn takes."""
        return len(self.category_ids) + 1

    def where(self, i: int) -> str:
        return f"{self.ann_file}: image {self.image_ids[i]} ({self.paths[i]})"


def _fail(ann_file, problems: list[str], what: str) -> DataError:
    shown = "\n".join(f"  {p}" for p in problems[:SHOW])
    more = f"\n  ... and {len(problems) - SHOW} more" if len(problems) > SHOW else ""
    return DataError(f"{ann_file}: {len(problems)} {what}:\n{shown}{more}")


def _load_json(ann_file: Path) -> dict:
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{ann_file}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: a COCO annotation file holds a JSON object, not {type(data).__name__}")
    lacking = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if lacking:
        raise DataError(f"{ann_file}: not a COCO instances file: no {' / '.join(lacking)} list")
    return data


def _unique_ids(ann_file, items: list, what: str) -> None:
    bad = [f"{what} entry {n}: no integer 'id'" for n, x in enumerate(items)
           if not isinstance(x, dict) or not isinstance(x.get("id"), int)]
    if bad:
        raise _fail(ann_file, bad, f"{what} entries without an id")
    dup = sorted(i for i, n in Counter(x["id"] for x in items).items() if n > 1)
    if dup:
        raise _fail(ann_file, [f"{what} id {i} appears more than once" for i in dup], f"duplicate {what} ids")


def _image_size(ann_file, img: dict, path: Path) -> tuple[int, int]:
    h, w = img.get("height"), img.get("width")
    if h is None or w is None:  # not in the JSON: the file header says (PIL reads no pixels here)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{ann_file}: image {img['id']} ({path}): cannot read its size ({e})") from None
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise DataError(f"{ann_file}: image {img['id']} ({path}): height {h!r} / width {w!r} are not positive "
                        "integers")
    return h, w


def _polygons(seg: list, skipped: CocoSkipped, where: str) -> list:
    ok = []
    for poly in seg:
        if isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and \
                all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly):
            ok.append([float(v) for v in poly])
        else:
            skipped.add("short-polygon", where)
    return ok


def _area(seg, box_xywh, h: int, w: int) -> float:
    if isinstance(seg, list) and seg:
        return float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))))
    if isinstance(seg, dict):
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
        return float(mask_utils.area(rle))
    return float(box_xywh[2] * box_xywh[3])


def read_coco(ann_file: str | Path, image_dir: str | Path) -> CocoSplit:
    """Read and check a COCO instances JSON and its image folder (see the module docstring)."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    data = _load_json(ann_file)
    images, anns, cats = data["images"], data["annotations"], data["categories"]
    for items, what in ((cats, "category"), (images, "image"), (anns, "annotation")):
        _unique_ids(ann_file, items, what)

    category_ids = sorted(c["id"] for c in cats)
    label_of = {c: i + 1 for i, c in enumerate(category_ids)}
    names = {c["id"]: str(c.get("name", c["id"])) for c in cats}

    images = sorted(images, key=lambda x: x["id"])
    bad_name = [f"image {x['id']}: no 'file_name'" for x in images if not isinstance(x.get("file_name"), str)]
    if bad_name:
        raise _fail(ann_file, bad_name, "images without a file name")
    paths = [image_dir / x["file_name"] for x in images]
    missing = [f"image {x['id']}: {p} not found" for x, p in zip(images, paths) if not p.is_file()]
    if missing:
        raise _fail(ann_file, missing, f"image files missing under {image_dir}")
    sizes = [_image_size(ann_file, x, p) for x, p in zip(images, paths)]
    position = {x["id"]: i for i, x in enumerate(images)}

    problems = []
    for a in anns:
        if a.get("image_id") not in position:
            problems.append(f"annotation {a['id']}: image_id {a.get('image_id')!r} is not among the images")
        elif a.get("category_id") not in label_of:
            problems.append(f"annotation {a['id']} (image {a['image_id']}): category_id {a.get('category_id')!r} "
                            f"is not among the categories {category_ids[:20]}")
        else:
            b = a.get("bbox")
            if not (isinstance(b, list) and len(b) == 4 and
                    all(isinstance(v, (int, float)) and math.isfinite(v) for v in b)):
                problems.append(f"annotation {a['id']} (image {a['image_id']}): bbox {b!r} is not [x, y, w, h]")
    if problems:
        raise _fail(ann_file, problems, "annotations that cannot be used")

    skipped = CocoSkipped()
    per_image = [([], [], [], []) for _ in images]  # ann ids, boxes, labels, segmentations
    eval_anns = []
    for a in sorted(anns, key=lambda x: x["id"]):
        i = position[a["image_id"]]
        h, w = sizes[i]
        where = f"{ann_file}: annotation {a['id']} (image {a['image_id']})"
        x, y, bw, bh = (float(v) for v in a["bbox"])
        if a.get("iscrowd", 0):
            skipped.add("crowd", where)
            seg = a.get("segmentation")
            if isinstance(seg, list):
                seg = _polygons(seg, CocoSkipped(), where)  # not trained on: its polygons are not counted
            elif isinstance(seg, dict) and list(seg.get("size", ())) != [h, w]:
                raise DataError(f"{where}: crowd RLE size {seg.get('size')} is not the image's [{h}, {w}]")
            if not (isinstance(seg, dict) or seg):
                seg = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]  # COCOeval's segm IoU needs a region
            area = a.get("area")
            area = float(area) if isinstance(area, (int, float)) else _area(seg, a["bbox"], h, w)
            eval_anns.append({**a, "iscrowd": 1, "segmentation": seg, "area": area})
            continue
        if bw <= 0 or bh <= 0:
            skipped.add("empty-box", where)
            continue
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
        if x2 <= x1 or y2 <= y1:
            skipped.add("box-outside", where)
            continue
        seg = a.get("segmentation")
        if isinstance(seg, list) and seg:
            seg = _polygons(seg, skipped, where)
            if not seg:
                skipped.add("no-polygon", where)
                continue
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if list(seg["size"]) != [h, w]:
                raise DataError(f"{where}: RLE size {seg['size']} is not the image's [{h}, {w}]")
        else:
            skipped.add("no-segmentation", where)
            continue
        if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
            skipped.add("clipped-box", where)
        ids, boxes, labels, segs = per_image[i]
        ids.append(a["id"])
        boxes.append((x1, y1, x2, y2))
        labels.append(label_of[a["category_id"]])
        segs.append(seg)
        box_xywh = [x1, y1, x2 - x1, y2 - y1]
        eval_anns.append({**a, "bbox": box_xywh, "segmentation": seg, "iscrowd": 0,
                          "area": float(a["area"]) if isinstance(a.get("area"), (int, float)) else
                          _area(seg, box_xywh, h, w)})

    annotations = [ImageAnnotations(ids, np.asarray(boxes, np.float32).reshape(-1, 4),
                                    np.asarray(labels, np.int64), segs) for ids, boxes, labels, segs in per_image]
    gt = {"images": [{**x, "height": h, "width": w} for x, (h, w) in zip(images, sizes)],
          "annotations": eval_anns, "categories": sorted(cats, key=lambda c: c["id"])}
    for key in ("info", "licenses"):
        if key in data:
            gt[key] = data[key]
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    if skipped.counts:
        log.warning("%s: %s", ann_file, skipped.describe())
    return CocoSplit(ann_file=ann_file, image_dir=image_dir, image_ids=[x["id"] for x in images], paths=paths,
                     heights=[h for h, _ in sizes], widths=[w for _, w in sizes], annotations=annotations,
                     category_ids=category_ids, category_names=[names[c] for c in category_ids], skipped=skipped,
                     coco=coco)


def decode_masks(split: CocoSplit, i: int) -> np.ndarray:
    """The training masks of image i: uint8 [n, H, W] (0/1) at the image's size."""
    h, w = split.heights[i], split.widths[i]
    segs = split.annotations[i].segmentations
    out = np.zeros((len(segs), h, w), np.uint8)
    for j, seg in enumerate(segs):
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        out[j] = mask_utils.decode(rle)
    return out
