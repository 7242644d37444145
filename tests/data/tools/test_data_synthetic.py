"""The synthetic generator: parseable Tencent files whose labels match the drawn objects; COCO instances and
ADE20K labels of new scenes that match the rendered pixels; extra outputs added without rewriting the rest."""
import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hvpmtl.cli import main as cli_main
from hvpmtl.data.formats.dictionary import read_dictionary
from hvpmtl.data.formats.list_file import read_list_file
from hvpmtl.data.tools.synthetic import make_synthetic
from hvpmtl.data.tools.synthetic_dense import mask_bbox, mask_to_segmentation
from hvpmtl.data.tools.synthetic_scenes import (COLOURS, OBJECT_CLASSES, SHAPES, object_class, render_scene,
                                                render_scene_with_masks)
from hvpmtl.data.tools.validate import validate_list


def _objects(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_files_parse_and_validate_clean(syn):
    d = read_dictionary(syn["dictionary"])
    assert len(d) == 24
    labels, issues = read_list_file(syn["list_file"], len(d))
    assert len(labels) == 40 and not [i for i in issues if i.is_error]
    rep = validate_list(syn["list_file"], syn["root"], dictionary=syn["dictionary"], full_decode=True)
    assert rep.errors == [] and rep.num_samples == 40
    hold, _ = read_list_file(syn["holdout_list"], len(d))
    assert len(hold) == 10 and not set(hold.path(i) for i in range(10)) & set(labels.path(i) for i in range(40))


def test_labels_are_drawn_objects_plus_ancestors(syn):
    d = read_dictionary(syn["dictionary"])
    index = {n: i for i, n in enumerate(d.names)}
    labels, _ = read_list_file(syn["list_file"], len(d))
    confs = set()
    for i, rec in enumerate(_objects(syn["objects"])):
        assert labels.path(i) == rec["path"]
        leaves = {index[o[k]] for o in rec["objects"] for k in ("shape", "colour", "texture")}
        if len(rec["objects"]) >= 4:
            leaves.add(index["crowded scene"])
        expect = leaves | {a for leaf in leaves for a in d.ancestors(leaf)}
        got = labels.label_dict(i)
        assert set(got) == expect
        for k, c in got.items():  # an ancestor is at least as confident as each child
            for a in d.ancestors(k):
                assert got[a] >= c
        confs |= set(got.values())
    assert {1.0, 0.9, 0.8} <= {round(c, 3) for c in confs} <= {1.0, 0.9, 0.8}


def test_pixels_show_the_drawn_colours(syn):
    root = Path(syn["root"])
    checked = 0
    for rec in _objects(syn["objects"]):
        img = np.asarray(Image.open(root / rec["path"]).convert("RGB")).astype(float)
        assert img.shape[:2] == (rec["height"], rec["width"])
        assert 160 <= rec["width"] <= 256 and 120 <= rec["height"] <= 192
        for o in rec["objects"]:
            x, y = o["anchor"]
            patch = img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
            assert np.abs(patch - np.array(COLOURS[o["colour"]])).max() < 40, (rec["path"], o)
            checked += 1
    assert checked >= 40


def test_same_seed_same_data(tmp_path):
    a = make_synthetic(tmp_path / "a", 5, seed=9)
    b = make_synthetic(tmp_path / "b", 5, seed=9)
    c = make_synthetic(tmp_path / "c", 5, seed=10)
    assert Path(a["list_file"]).read_text() == Path(b["list_file"]).read_text()
    assert Path(a["list_file"]).read_text() != Path(c["list_file"]).read_text()
    assert (Path(a["root"]) / "train/000/0000004.jpg").read_bytes() == (Path(b["root"]) / "train/000/0000004.jpg").read_bytes()


def test_cli_make_synthetic_with_shards(tmp_path, capsys):
    rc = cli_main(["data", "make-synthetic", "--out", str(tmp_path / "d"), "--num-images", "6", "--seed", "1",
                   "--holdout", "2", "--shard-size", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and f"list_file: {tmp_path / 'd' / 'train.txt'}" in out and "--set data.list_file=" in out
    assert len(read_list_file(tmp_path / "d" / "holdout.txt", 24)[0]) == 2
    assert sorted(p.name for p in (tmp_path / "d" / "shards").iterdir()) == [
        "labels.npz", "manifest.json", "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar"]
    tars = sorted((tmp_path / "d" / "shards").glob("*.tar"))
    _stamp_old(tars)
    assert cli_main(["data", "make-synthetic", "--out", str(tmp_path / "d"), "--num-images", "6", "--seed", "1",
                     "--holdout", "2", "--shard-size", "4"]) == 0
    assert "kept shards (shards of 4)" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == 10**18 for p in tars)


def test_object_images_show_their_class_and_fill_the_frame():
    """The fine-tuning ImageFolder's images: one object, of the class's colour and texture, most of the frame."""
    for i in range(12):
        colour, texture = OBJECT_CLASSES[i % len(OBJECT_CLASSES)].split("-")
        img, objects = render_scene(np.random.default_rng([0, 2, i]), single=True, colour=colour, texture=texture)
        assert len(objects) == 1 and object_class(objects[0]) == f"{colour}-{texture}"
        o = objects[0]
        assert o["r"] >= 0.32 * min(img.shape[:2]) - 1e-6
        x, y = o["anchor"]
        patch = img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).astype(float).mean(0)
        assert np.abs(patch - np.array(COLOURS[colour])).max() < 40, (i, o)
        # stripes and dots darken part of the object; a plain object is its colour throughout
        inside = np.abs(img.astype(float) - np.array(COLOURS[colour])).max(-1) < 30
        dark = np.abs(img.astype(float) - 0.35 * np.array(COLOURS[colour])).max(-1) < 12
        assert (dark.sum() > 0.05 * inside.sum()) == (texture != "plain"), (i, texture)


# ---- dense downstream data: COCO instances and ADE20K-style labels ----

SEED = 5
DENSE = dict(coco=True, coco_train=10, coco_val=4, ade20k=True, ade20k_train=6, ade20k_val=5)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("dense"), 8, seed=SEED, holdout=4, **DENSE)


def _scene(split: str, i: int):
    """Scene i of a dense split drawn anew: (pixels, objects, drawn masks)."""
    return render_scene_with_masks(np.random.default_rng([SEED, {"train": 4, "val": 5}[split], i]))


def _iou(a, b) -> float:
    return (a & b).sum() / (a | b).sum()


def _extent(mask) -> list[float]:
    rows, cols = np.any(mask, 1), np.any(mask, 0)
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def test_coco_instances_are_the_drawn_objects(dense):
    shapes_seen, rings = set(), 0
    for split, num in (("train", DENSE["coco_train"]), ("val", DENSE["coco_val"])):
        coco = COCO(dense[f"coco_{split}_ann"])
        cats = coco.loadCats(coco.getCatIds())
        assert [c["id"] for c in cats] == [1, 2, 3, 5, 8, 13, 21, 34]  # not contiguous, as real COCO's
        assert [c["name"] for c in cats] == SHAPES
        cat_of = {c["name"]: c["id"] for c in cats}
        assert sorted(coco.getImgIds()) == list(range(1, num + 1))
        for img in coco.loadImgs(coco.getImgIds()):
            pixels, objects, drawn = _scene(split, img["id"] - 1)
            h, w = pixels.shape[:2]
            assert (img["height"], img["width"]) == (h, w)
            jpeg = np.asarray(Image.open(Path(dense[f"coco_{split}_images"]) / img["file_name"]).convert("RGB"))
            # JPEG loses some of the per-pixel grey noise (<= 8 on average); another scene differs by ~40
            assert jpeg.shape == pixels.shape and np.abs(jpeg.astype(float) - pixels).mean() < 12
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            assert len(anns) == len(objects)
            # object pixels are saturated colours (their dark texture too), the background is grey +-10
            saturated = (pixels.max(-1).astype(int) - pixels.min(-1)) > 35
            for o, m in zip(objects, drawn):
                decoded = [coco.annToMask(a).astype(bool) for a in anns]
                match = [a for a, d in zip(anns, decoded) if _iou(d, m) > 0.9]
                assert len(match) == 1, (split, img["id"], o)
                a, d = match[0], coco.annToMask(match[0]).astype(bool)
                assert a["category_id"] == cat_of[o["shape"]] and a["iscrowd"] == 0
                cell = np.zeros((h, w), bool)
                cx, cy = int(o["cx"] // (w / 3)), int(o["cy"] // (h / 2))
                cell[int(cy * h / 2):int((cy + 1) * h / 2) + 1, int(cx * w / 3):int((cx + 1) * w / 3) + 1] = True
                assert _iou(d, saturated & cell) > 0.9, (split, img["id"], o)  # the pixels as rendered
                assert a["bbox"] == _extent(m) == _extent(d)
                assert a["area"] == m.sum() and abs(d.sum() - a["area"]) <= 0.02 * a["area"]
                if o["shape"] == "ring":  # a hole: uncompressed RLE, as COCO writes it, and the hole is empty
                    assert isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], list)
                    assert not d[int(round(o["cy"])), int(round(o["cx"]))]
                    rings += 1
                else:
                    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
                shapes_seen.add(o["shape"])
    assert shapes_seen == set(SHAPES) and rings  # every category, and the RLE path, checked


def test_coco_files_score_themselves_perfectly(dense, capsys):
    """COCO's own evaluation of the annotations as detections: AP 1 for boxes and masks (unique ids, areas and
    crowd flags as COCOeval expects them, non-contiguous categories mapped)."""
    for split in ("train", "val"):
        gt = COCO(dense[f"coco_{split}_ann"])
        ids = [a["id"] for a in gt.dataset["annotations"]]
        assert len(set(ids)) == len(ids) and min(ids) >= 1
        dt = gt.loadRes([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
                          "segmentation": copy.deepcopy(a["segmentation"]), "score": 1.0}
                         for a in gt.dataset["annotations"]])
        for kind in ("bbox", "segm"):
            ev = COCOeval(gt, dt, kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert ev.stats[0] == 1.0, (split, kind, ev.stats[:2])


def test_mask_to_segmentation_hand_cases():
    one = np.zeros((5, 6), bool)
    one[2, 3] = True
    seg = mask_to_segmentation(one)
    # the contour through the midpoints of the pixel's edges (pixel (3, 2) spans [3, 4] x [2, 3])
    assert sorted(map(tuple, np.array(seg[0]).reshape(-1, 2).tolist())) == [(3, 2.5), (3.5, 2), (3.5, 3), (4, 2.5)]
    assert (mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, 5, 6))).astype(bool) == one).all()
    assert mask_bbox(one) == [3.0, 2.0, 1.0, 1.0]
    two = np.zeros((6, 8), bool)
    two[1:3, 1:4] = True
    two[4:6, 5:7] = True
    seg = mask_to_segmentation(two)
    assert len(seg) == 2
    assert (mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, 6, 8))).astype(bool) == two).all()
    ring = np.zeros((4, 4), bool)
    ring[:3, :3] = True
    ring[1, 1] = False
    # column-major runs, starting with background: 0 x0, 3 x1, 1 x0, 1 x1, 1 x0, 1 x1, 1 x0, 3 x1, 5 x0
    assert mask_to_segmentation(ring) == {"size": [4, 4], "counts": [0, 3, 1, 1, 1, 1, 1, 3, 5]}
    hole_first = np.ones((4, 4), bool)
    hole_first[0, 0] = False
    hole_first[2, 2] = False
    assert mask_to_segmentation(hole_first)["counts"] == [1, 9, 1, 5]


def test_ade20k_labels_are_the_drawn_shapes(dense):
    root = Path(dense["ade20k_root"])
    assert Path(dense["ade20k_classes"]).read_text().splitlines() == SHAPES  # label k = line k
    for split, folder, num in (("train", "training", DENSE["ade20k_train"]), ("val", "validation",
                                                                             DENSE["ade20k_val"])):
        images = sorted((root / "images" / folder).glob("*.jpg"))
        labels = sorted((root / "annotations" / folder).glob("*.png"))
        assert [p.stem for p in images] == [p.stem for p in labels] == [f"ADE_{split}_{i:08d}"
                                                                          for i in range(1, num + 1)]
        coco_dir = Path(dense[f"coco_{split}_images"])
        for i, (ip, lp) in enumerate(zip(images, labels)):
            pixels, objects, drawn = _scene(split, i)
            lab = Image.open(lp)
            assert lab.mode == "L" and lab.size == Image.open(ip).size == (pixels.shape[1], pixels.shape[0])
            lab = np.asarray(lab)
            assert set(np.unique(lab)) <= set(range(9))
            expect = np.zeros(lab.shape, np.uint8)
            for o, m in zip(objects, drawn):
                assert (lab[m] == SHAPES.index(o["shape"]) + 1).all()
                expect[m] = SHAPES.index(o["shape"]) + 1
            assert (lab == expect).all()  # background 0 everywhere else
            coco_img = coco_dir / f"{i + 1:012d}.jpg"
            if coco_img.exists():  # the same scene serves both
                assert coco_img.read_bytes() == ip.read_bytes()


def test_dense_scenes_are_not_pretraining_images(dense):
    root = Path(dense["root"])
    pre = [root / line.split()[0] for lst in ("train.txt", "holdout.txt") for line in (root / lst).read_text()
           .splitlines()]
    down = sorted(Path(dense["coco_train_images"]).parent.glob("*/*.jpg")) + sorted(
        Path(dense["ade20k_root"]).glob("images/*/*.jpg"))
    assert len(pre) == 12 and len(down) == 10 + 4 + 6 + 5
    assert not {p.resolve() for p in pre} & {p.resolve() for p in down}
    pre_px = [np.asarray(Image.open(p).convert("RGB")).astype(float) for p in pre]
    for p in down:
        px = np.asarray(Image.open(p).convert("RGB")).astype(float)
        assert all(q.shape != px.shape or np.abs(q - px).mean() > 25 for q in pre_px), p  # same: < 8


def _stamp_old(paths) -> None:
    for p in paths:
        os.utime(p, ns=(10**18, 10**18))


def test_adding_outputs_keeps_the_pretraining_split(tmp_path, capsys):
    out = tmp_path / "d"
    base = ["data", "make-synthetic", "--out", str(out), "--num-images", "7", "--seed", "2", "--holdout", "3"]
    assert cli_main(base) == 0
    capsys.readouterr()
    train = sorted((out / "train").rglob("*.jpg")) + sorted((out / "holdout").rglob("*.jpg"))
    _stamp_old(train)  # a rewrite would make them new
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in train}
    listed = (out / "train.txt").read_bytes()
    extra = ["--imagefolder", "--imagefolder-train", "18", "--coco", "--coco-train", "3", "--coco-val", "2",
             "--ade20k", "--ade20k-train", "2"]
    assert cli_main(base + extra) == 0
    text = capsys.readouterr().out
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in train} == before
    assert (out / "train.txt").read_bytes() == listed
    # imagefolder 18 + 3, dense scenes max(3, 2) + max(2, 3): COCO and ADE20K share them
    assert "kept train (7 images, seed 2)" in text and "wrote 27 images" in text
    assert f"--set data.train_dir={out / 'imagefolder' / 'train'}" in text
    assert (f"--set data.format=coco --set data.train_ann={out / 'coco/annotations/instances_train.json'} "
            f"--set data.train_images="
            f"{out / 'coco/train'} --set data.val_ann={out / 'coco/annotations/instances_val.json'} "
            f"--set data.val_images={out / 'coco/val'}") in text
    assert f"--set data.format=ade20k --set data.root={out / 'ade20k'} --set data.num_classes=8" in text
    assert len(list((out / "ade20k/images/validation").glob("*.jpg"))) == 3  # --holdout
    assert len(list((out / "coco/val").glob("*.jpg"))) == 2

    # everything there already: nothing written; fewer ADE20K scenes: the surplus files go (readers list folders)
    dense = sorted((out / "coco").rglob("*.jpg"))
    _stamp_old(dense)
    assert cli_main(base + extra[:-1] + ["1"]) == 0
    cap = capsys.readouterr()
    assert "rewriting ade20k" in cap.err and "kept coco" in cap.out and "kept imagefolder" in cap.out
    assert all(p.stat().st_mtime_ns == 10**18 for p in dense)
    assert [p.name for p in (out / "ade20k/images/training").iterdir()] == ["ADE_train_00000001.jpg"]
    assert sorted(p.name for p in (out / "ade20k/annotations/training").iterdir()) == ["ADE_train_00000001.png"]

    # other arguments, or no record of them: rewritten, and said so
    assert cli_main(base[:-1] + ["4"]) == 0
    cap = capsys.readouterr()
    assert "rewriting holdout" in cap.err and "holdout.txt" in cap.out
    assert all(p.stat().st_mtime_ns == 10**18 for p in train[:7])
    (out / "synthetic.json").unlink()
    assert cli_main(base) == 0
    cap = capsys.readouterr()
    assert f"rewriting train in {out}: {out / 'train.txt'} has no record" in cap.err
    assert all(p.stat().st_mtime_ns != 10**18 for p in train[:7]) and (out / "train.txt").read_bytes() == listed


def test_dense_counts_must_be_positive(tmp_path, capsys):
    assert cli_main(["data", "make-synthetic", "--out", str(tmp_path / "z"), "--num-images", "2", "--coco",
                     "--coco-val", "0"]) == 2
    assert "--coco-train and --coco-val must be at least 1" in capsys.readouterr().err
