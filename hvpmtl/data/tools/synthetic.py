"""A synthetic multi-label data set in Tencent ML-Images format, learnable from pixels.

The scenes (synthetic_scenes.py) hold shapes whose labels are their shape, colour and texture plus ancestors, as
Tencent's labels include ancestors; the dense tasks' annotations: synthetic_dense.py. Images are real JPEGs of
varied size (160x120 to 256x192); each image has its own generator, seeded by (seed, split id, index).

Split ids: 0 train, 1 holdout (pre-training); 2, 3 the fine-tuning ImageFolder's train and val; 4, 5 the
dense downstream scenes (train, val), which COCO instances (coco/) and ADE20K-style labels (ade20k/) share:
scene i of a split is the same image in both. Downstream data is never a pre-training scene.

The outputs are parts (train, holdout, shards, imagefolder, coco, ade20k) recorded with their arguments in
out/synthetic.json: a part written before with the same arguments is kept as it is (files untouched), so
the extra outputs can be added to an existing data set without rewriting the pre-training images.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from hvpmtl.data.formats.dictionary import Dictionary, write_dictionary
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.formats.list_file import write_list_file
from hvpmtl.data.tools.jobs import Progress
from hvpmtl.data.tools.synthetic_dense import coco_annotation, coco_categories, label_map
from hvpmtl.data.tools.synthetic_scenes import (OBJECT_CLASSES, SHAPES, dictionary, render_scene,
                                                render_scene_with_masks, scene_labels)


def _write_split(out: Path, split: str, split_id: int, num: int, seed: int, d: Dictionary,
                 progress: bool = False) -> tuple[Path, Path]:
    list_path, obj_path = out / f"{split}.txt", out / f"{split}_objects.jsonl"
    entries = []
    prog = Progress(f"make-synthetic {split}", num, unit="images", enabled=progress)
    with open(obj_path, "w") as fo:
        for i in range(num):
            prog.add(1)
            rng = np.random.default_rng([seed, split_id, i])
            img, objects = render_scene(rng)
            labels = scene_labels(objects, rng, d)
            rel = f"{split}/{i // 1000:03d}/{i:07d}.jpg"
            p = out / rel
            if i % 1000 == 0:
                p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(p, quality=int(rng.integers(85, 96)))
            entries.append((rel, labels))
            fo.write(json.dumps({"path": rel, "width": img.shape[1], "height": img.shape[0],
                                 "objects": objects}) + "\n")
    write_list_file(list_path, entries)
    prog.close()
    return list_path, obj_path


def _write_object_split(dest: Path, split_id: int, num: int, seed: int, progress: bool) -> None:
    """dest/<colour>-<texture>/<i>.jpg: object-centric images (one object filling most of the frame, random
    shape), the downstream data of fine-tuning, as ImageNet is after multi-label pre-training.

    Classes go round in turn (image i has class i mod 18), so any num >= 18 holds every class and a small
    labelled set (the low-label protocol) is balanced.
    """
    prog = Progress(f"make-synthetic {dest.name}", num, unit="images", enabled=progress)
    for i in range(num):
        prog.add(1)
        rng = np.random.default_rng([seed, split_id, i])
        name = OBJECT_CLASSES[i % len(OBJECT_CLASSES)]
        colour, texture = name.split("-")
        img, _ = render_scene(rng, single=True, colour=colour, texture=texture)
        d = dest / name
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:07d}.jpg", quality=int(rng.integers(85, 96)))
    prog.close()


def write_imagefolder(dest: Path, num_train: int, num_val: int, seed: int = 0, progress: bool = False) -> None:
    """The fine-tuning data: dest/train (num_train images) and dest/val (num_val), object-centric, 18 classes."""
    for split, split_id, num in (("train", 2, num_train), ("val", 3, num_val)):
        _write_object_split(dest / split, split_id, num, seed, progress)
        _remove_stale(dest / split, "*/*.jpg", num, first=0)


# ---- dense downstream data: COCO instances and ADE20K-style semantic labels of the same scenes ----

DENSE_SPLITS = {"train": ("training", 4), "val": ("validation", 5)}  # split -> (ADE20K folder, split id)
DENSE_TRAIN, DENSE_VAL = 150, 50  # default scene counts of --coco / --ade20k (val: --holdout when given)


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)  # a reader never sees half a file


def _write_dense_split(out: Path, split: str, seed: int, num_coco: int, num_ade20k: int, progress: bool) -> int:
    """Scenes 0..n-1 of the split's id: the first num_coco into coco/, the first num_ade20k into ade20k/ (the
    same JPEG bytes). COCO: {i+1:012d}.jpg, image_id i+1; ADE20K: ADE_<split>_{i+1:08d}.jpg/.png, as the
    originals are named. Returns the number of images written."""
    ade_folder, split_id = DENSE_SPLITS[split]
    coco_images, ade_images, ade_labels = out / "coco" / split, out / "ade20k/images" / ade_folder, \
        out / "ade20k/annotations" / ade_folder
    for d, num in ((coco_images, num_coco), (ade_images, num_ade20k), (ade_labels, num_ade20k)):
        if num:
            d.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    n = max(num_coco, num_ade20k)
    prog = Progress(f"make-synthetic dense {split}", n, unit="images", enabled=progress)
    for i in range(n):
        prog.add(1)
        rng = np.random.default_rng([seed, split_id, i])
        img, objects, masks = render_scene_with_masks(rng)
        jpeg = _jpeg(img, int(rng.integers(85, 96)))
        if i < num_coco:
            images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": img.shape[1],
                           "height": img.shape[0]})
            (coco_images / images[-1]["file_name"]).write_bytes(jpeg)
            anns += [coco_annotation(m, len(anns) + k + 1, i + 1, o["shape"])
                     for k, (o, m) in enumerate(zip(objects, masks))]
        if i < num_ade20k:
            stem = f"ADE_{split}_{i + 1:08d}"
            (ade_images / f"{stem}.jpg").write_bytes(jpeg)
            Image.fromarray(label_map(objects, masks), mode="L").save(ade_labels / f"{stem}.png")
    prog.close()
    if num_coco:
        (out / "coco/annotations").mkdir(parents=True, exist_ok=True)
        _write_json(out / f"coco/annotations/instances_{split}.json",
                    {"info": {"description": f"hvpmtl synthetic scenes, {split} (seed {seed}, split id {split_id})"},
                     "licenses": [], "images": images, "annotations": anns, "categories": coco_categories()})
        _remove_stale(coco_images, "*.jpg", num_coco, first=1)
    if num_ade20k:
        _remove_stale(ade_images, f"ADE_{split}_*.jpg", num_ade20k, first=1)
        _remove_stale(ade_labels, f"ADE_{split}_*.png", num_ade20k, first=1)
    return n


def _remove_stale(folder: Path, pattern: str, num: int, first: int) -> None:
    """Delete the numbered files of an earlier, larger run (this run's are first..first+num-1): readers that
    list a folder (ImageFolder, ADE20K) would take them. Class folders left empty go too."""
    for p in folder.glob(pattern):
        m = re.search(r"(\d+)$", p.stem)
        if m and int(m.group(1)) >= first + num:
            p.unlink()
            if p.parent != folder and not any(p.parent.iterdir()):
                p.parent.rmdir()


# ---- the data set as parts, each kept when it was written before with the same arguments ----

MANIFEST = "synthetic.json"
GENERATOR = 1  # bump when the same arguments would draw other pixels: parts recorded under another are rewritten


@dataclass
class SyntheticResult:
    paths: dict[str, str]  # root, list_file, dictionary, ... (make_synthetic's return value)
    images_written: int = 0
    kept: list[str] = field(default_factory=list)  # parts left as they were, described
    notes: list[str] = field(default_factory=list)  # parts rewritten although present, and why


class _Parts:
    """out/synthetic.json: each part's arguments, recorded once the part is complete."""

    def __init__(self, out: Path, result: SyntheticResult):
        self.out, self.result = out, result
        try:
            self.recorded = json.loads((out / MANIFEST).read_text()).get("parts", {})
        except (OSError, ValueError, AttributeError):  # none, or unreadable: nothing is known to be there
            self.recorded = {}
        if not isinstance(self.recorded, dict):
            self.recorded = {}

    def keep(self, part: str, args: dict, files: list[str], what: str) -> bool:
        """True when the part is there with these arguments (then leave it); else forget it, to be rewritten."""
        old = self.recorded.get(part)
        if old == args and all((self.out / f).exists() for f in files):
            self.result.kept.append(f"{part} ({what}): written before with the same arguments")
            return True
        if old is not None and old != args:
            diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in args.items() if old.get(k) != v)
            self.result.notes.append(f"rewriting {part} in {self.out}: other arguments than before ({diff})")
        elif old is not None:
            self.result.notes.append(f"rewriting {part} in {self.out}: some of its files are missing")
        elif (self.out / files[0]).exists():
            self.result.notes.append(f"rewriting {part} in {self.out}: {self.out / files[0]} has no record of its "
                                     f"arguments in {MANIFEST} (written by an older hvpmtl, or interrupted)")
        self.set(part, None)
        return False

    def set(self, part: str, args: dict | None) -> None:
        if args is None:
            self.recorded.pop(part, None)
        else:
            self.recorded[part] = args
        _write_json(self.out / MANIFEST, {"generator": GENERATOR, "parts": self.recorded})


def write_synthetic(out: str | os.PathLike, num_images: int, seed: int = 0, holdout: int = 0,
                    shard_size: int = 0, imagefolder: bool = False, imagefolder_train: int | None = None,
                    coco: bool = False, coco_train: int | None = None, coco_val: int | None = None,
                    ade20k: bool = False, ade20k_train: int | None = None, ade20k_val: int | None = None,
                    progress: bool = False) -> SyntheticResult:
    """Write the data set under `out` (see make_synthetic), keeping the parts already there with the same
    arguments; returns the paths, the number of images written and what was kept or rewritten."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if imagefolder and not holdout:
        raise DataError("make-synthetic --imagefolder needs --holdout N: the number of imagefolder/val images")
    dense = {"coco": (coco, coco_train, coco_val), "ade20k": (ade20k, ade20k_train, ade20k_val)}
    counts = {}
    for name, (on, n_train, n_val) in dense.items():
        if on:
            counts[name] = (DENSE_TRAIN if n_train is None else n_train, (holdout or DENSE_VAL) if n_val is None
                            else n_val)
            if min(counts[name]) < 1:
                raise DataError(f"make-synthetic --{name}: --{name}-train and --{name}-val must be at least 1, "
                                f"got {counts[name][0]} and {counts[name][1]}")
    res = SyntheticResult({"root": str(out), "dictionary": str(out / "dictionary.txt")})
    parts = _Parts(out, res)
    d = dictionary()

    args = {"num_images": num_images, "seed": seed, "generator": GENERATOR}
    train_kept = parts.keep("train", args, ["train.txt", "train_objects.jsonl", "dictionary.txt"],
                            f"{num_images} images, seed {seed}")
    if not train_kept:
        parts.set("shards", None)  # shards of the old train split
        write_dictionary(out / "dictionary.txt", d)
        _write_split(out, "train", 0, num_images, seed, d, progress)
        res.images_written += num_images
        parts.set("train", args)
    res.paths.update(list_file=str(out / "train.txt"), objects=str(out / "train_objects.jsonl"))
    if holdout:
        args = {"num": holdout, "seed": seed, "generator": GENERATOR}
        if not parts.keep("holdout", args, ["holdout.txt", "holdout_objects.jsonl"], f"{holdout} images"):
            _write_split(out, "holdout", 1, holdout, seed, d, progress)
            res.images_written += holdout
            parts.set("holdout", args)
        res.paths.update(holdout_list=str(out / "holdout.txt"), holdout_objects=str(out / "holdout_objects.jsonl"))
    if imagefolder:
        n_train = num_images if imagefolder_train is None else imagefolder_train
        args = {"train": n_train, "val": holdout, "seed": seed, "generator": GENERATOR}
        if not parts.keep("imagefolder", args, ["imagefolder/train", "imagefolder/val"],
                          f"{n_train} + {holdout} images"):
            write_imagefolder(out / "imagefolder", n_train, holdout, seed, progress)
            res.images_written += n_train + holdout
            parts.set("imagefolder", args)
        res.paths.update(imagefolder_train=str(out / "imagefolder" / "train"),
                         imagefolder_val=str(out / "imagefolder" / "val"))
    files = {"coco": ["coco/annotations/instances_train.json", "coco/annotations/instances_val.json"],
             "ade20k": ["ade20k/classes.txt", "ade20k/images/training", "ade20k/images/validation"]}
    todo = {name: (n_train, n_val) for name, (n_train, n_val) in counts.items()
            if not parts.keep(name, {"train": n_train, "val": n_val, "seed": seed, "generator": GENERATOR},
                              files[name], f"{n_train} + {n_val} scenes")}
    for split, k in (("train", 0), ("val", 1)):
        if todo:
            res.images_written += _write_dense_split(out, split, seed, todo.get("coco", (0, 0))[k],
                                                     todo.get("ade20k", (0, 0))[k], progress)
    if "ade20k" in todo:
        (out / "ade20k/classes.txt").write_text("".join(f"{s}\n" for s in SHAPES))
    for name, (n_train, n_val) in todo.items():
        parts.set(name, {"train": n_train, "val": n_val, "seed": seed, "generator": GENERATOR})
    if "coco" in counts:
        res.paths.update({f"coco_{s}_{k}": str(out / p) for s in ("train", "val") for k, p in
                          (("ann", f"coco/annotations/instances_{s}.json"), ("images", f"coco/{s}"))})
    if "ade20k" in counts:
        res.paths.update(ade20k_root=str(out / "ade20k"), ade20k_classes=str(out / "ade20k/classes.txt"))

    if shard_size:
        from hvpmtl.data.tools.to_shards import write_shards
        args = {"shard_size": shard_size, "seed": seed, "generator": GENERATOR}
        if not parts.keep("shards", args, ["shards/manifest.json"], f"shards of {shard_size}"):
            write_shards(res.paths["list_file"], str(out), str(out / "shards"), shard_size, seed=seed, workers=1,
                         num_classes=len(d))
            parts.set("shards", args)
        res.paths["shards"] = str(out / "shards")
    return res


def make_synthetic(out: str | os.PathLike, num_images: int, seed: int = 0, holdout: int = 0,
                   shard_size: int = 0, imagefolder: bool = False, imagefolder_train: int | None = None,
                   progress: bool = False, coco: bool = False, coco_train: int | None = None,
                   coco_val: int | None = None, ade20k: bool = False, ade20k_train: int | None = None,
                   ade20k_val: int | None = None) -> dict[str, str]:
    """Write the data set under `out`; returns the paths (root, list_file, dictionary, ...).

    shard_size > 0 also writes the training split as webdataset shards of that many samples;
    imagefolder also writes the fine-tuning data, out/imagefolder/{train,val}/<colour>-<texture>/: object-centric
    images of their own (write_imagefolder), imagefolder_train of them (default num_images) to train on and
    `holdout` to validate on. coco: out/coco/{train,val}/*.jpg and annotations/instances_{train,val}.json
    (coco_train scenes, default 150, and coco_val, default `holdout` or 50), one instance per object, category =
    its shape (COCO_CATEGORY_IDS). ade20k: out/ade20k/images/{training,validation}/*.jpg and
    annotations/.../*.png (labels 0 = background, k = SHAPES[k - 1]; classes.txt), counts as for coco; scene i
    is the same image in both. Parts already there with the same arguments are kept (out/synthetic.json).
    """
    return write_synthetic(out, num_images, seed, holdout, shard_size, imagefolder, imagefolder_train, coco,
                           coco_train, coco_val, ade20k, ade20k_train, ade20k_val, progress).paths
