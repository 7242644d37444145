"""ADE20K (SceneParsing, `ADEChallengeData2016`) as a list of checked (image, annotation) pairs.

Layout: root/images/{training,validation}/NAME.jpg and root/annotations/{same}/NAME.png, the PNG a
single-channel map of class indices: 0 = "other" (ignored), 1..150 the classes. Labels come out as
mmseg's `reduce_zero_label`: 1..C -> 0..C-1, 0 -> 255 (ignore).

`read_ade20k` opens every pair's headers (no pixel decoded: a few seconds for the 20k training pairs)
and refuses, with one DataError listing each problem with its path: an empty or missing split folder,
an image without its annotation (both named), an image that cannot be opened, an annotation that is
not an 8-bit single-channel PNG, and an annotation of another size than its image. Annotations
without an image are left out, counted (`Ade20kSplit.orphans`) and reported in the log.

Palette PNGs ('P'): accepted, read as their raw indices (what ADE's official PNGs and many converted
sets store: the palette only colours the indices for viewing). RGB/RGBA (colour-coded masks) and
16-bit PNGs are refused: the class of a colour is not knowable here.

Values above num_classes are found where the pixels are decoded: by `read_label` (so in the loaders,
a DataError naming the PNG and the value), or for all files up front with `check_values=True`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hvpmtl.data.formats.issues import SHOW, DataError

log = logging.getLogger(__name__)

SPLITS = ("training", "validation")
IMAGE_SUFFIXES = (".jpg", ".jpeg")
LABEL_MODES = ("L", "P")  # 8-bit class indices (P: the indices, palette ignored)
IGNORE_INDEX = 255


def label_lut(num_classes: int) -> np.ndarray:
    """uint8 lookup table raw PNG value -> training label: 0 -> 255, v -> v - 1 for v in 1..C."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[1:num_classes + 1] = np.arange(num_classes, dtype=np.uint8)
    return lut


@dataclass(frozen=True, eq=False)  # eq would compare the arrays
class Ade20kSplit:
    """Sorted pairs of one split; `sizes` [N, 2] (height, width) from the headers."""
    root: Path
    split: str
    num_classes: int
    images: tuple[Path, ...]
    labels: tuple[Path, ...]
    sizes: np.ndarray
    orphans: int = 0  # annotations without an image, left out
    lut: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "lut", label_lut(self.num_classes))

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, i: int) -> np.ndarray:
        """[H, W, 3] uint8 RGB (grey and CMYK JPEGs converted)."""
        path = self.images[i]
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: cannot decode the image ({e})") from None
        if a.shape[:2] != tuple(self.sizes[i]):
            raise DataError(f"{path}: decoded {a.shape[1]}x{a.shape[0]}, its header said "
                            f"{self.sizes[i][1]}x{self.sizes[i][0]}")
        return a

    def read_raw_label(self, i: int) -> np.ndarray:
        """[H, W] uint8 as stored (0 = other, 1..C); a value above num_classes is a DataError."""
        path = self.labels[i]
        try:
            with Image.open(path) as im:
                _check_label_mode(path, im)
                a = np.asarray(im)  # 'P': the indices themselves
        except DataError:
            raise
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: cannot decode the annotation ({e})") from None
        top = int(a.max()) if a.size else 0
        if top > self.num_classes:
            raise DataError(f"{path}: label value {top} above num_classes={self.num_classes} (values must be 0 = "
                            f"ignored or 1..{self.num_classes}); is num_classes right for this data set?")
        return a

    def read_label(self, i: int) -> np.ndarray:
        """[H, W] uint8 training labels: 0..C-1, 255 = ignore."""
        return self.lut[self.read_raw_label(i)]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read_image(i), self.read_label(i)

    def describe(self) -> str:
        left = f"; {self.orphans} annotation(s) without an image left out" if self.orphans else ""
        return f"ADE20K {self.split}: {len(self)} pairs under {self.root}{left}"


def _check_label_mode(path: Path, im: Image.Image) -> None:
    if im.format != "PNG":
        raise DataError(f"{path}: annotation is {im.format or 'not a known format'}, not PNG (labels must be "
                        "stored losslessly)")
    if im.mode in ("RGB", "RGBA", "LA", "PA"):
        raise DataError(f"{path}: annotation is a {im.mode} PNG; it must be single-channel class indices "
                        "(8-bit 'L', or 'P' whose indices are the classes): convert a colour-coded mask to "
                        "indices first")
    if im.mode not in LABEL_MODES:
        raise DataError(f"{path}: annotation PNG has mode {im.mode}; it must be 8-bit single-channel class indices "
                        "('L' or 'P')")


def _pair_problem(img: Path, ann: Path) -> tuple[str, tuple[int, int] | None]:
    """('' or what is wrong, the image's (h, w)) from the two headers."""
    if not ann.is_file():
        return f"{img}: no annotation {ann} for this image", None
    try:
        with Image.open(img) as im:
            w, h = im.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return f"{img}: cannot read the image ({e})", None
    try:
        with Image.open(ann) as a:
            _check_label_mode(ann, a)
            aw, ah = a.size
    except DataError as e:
        return str(e), (h, w)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return f"{ann}: cannot read the annotation ({e})", (h, w)
    if (aw, ah) != (w, h):
        return f"{ann}: annotation is {aw}x{ah} but its image {img} is {w}x{h}", (h, w)
    return "", (h, w)


def read_ade20k(root: str | Path, split: str, num_classes: int = 150, *, check_values: bool = False) -> Ade20kSplit:
    """The checked, sorted pairs of `split` ("training" or "validation"); see the module docstring.
    check_values: also decode every annotation now and refuse values above num_classes."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"ADE20K split must be one of {SPLITS}, got '{split}'")
    if not 1 <= num_classes <= 254:
        raise DataError(f"ADE20K num_classes must be in 1..254 (uint8 labels, 255 = ignore), got {num_classes}")
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise DataError(f"{d}: no such folder (expected the ADEChallengeData2016 layout "
                            f"root/images/{split}/*.jpg and root/annotations/{split}/*.png)")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"{img_dir}: no .jpg images in this split folder")
    labels = [ann_dir / (p.stem + ".png") for p in images]
    problems, sizes = [], np.zeros((len(images), 2), np.int64)
    for k, (img, ann) in enumerate(zip(images, labels)):
        why, hw = _pair_problem(img, ann)
        if why:
            problems.append(why)
        elif hw is not None:
            sizes[k] = hw
    stems = {p.stem for p in images}
    orphans = sum(1 for p in ann_dir.glob("*.png") if p.stem not in stems)
    if problems:
        raise _refusal(root, split, problems, len(images))
    out = Ade20kSplit(root, split, num_classes, tuple(images), tuple(labels), sizes, orphans)
    if check_values:
        problems = []
        for i in range(len(out)):
            try:
                out.read_raw_label(i)
            except DataError as e:
                problems.append(str(e))
        if problems:
            raise _refusal(root, split, problems, len(images))
    if orphans:
        log.warning("%s/annotations/%s: %d annotation(s) have no image and are left out", root, split, orphans)
    return out


def _refusal(root: Path, split: str, problems: list[str], total: int) -> DataError:
    shown = "\n".join("  " + p for p in problems[:SHOW])
    more = f"\n  ... and {len(problems) - SHOW} more" if len(problems) > SHOW else ""
    return DataError(f"ADE20K {split} under {root}: {len(problems)} of {total} pairs cannot be used:\n{shown}{more}")
