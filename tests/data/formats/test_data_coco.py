"""hvpmtl.data.formats.coco (reading and checking a COCO split) and hvpmtl.data.loaders.coco (train / eval batches):
tiny JPEGs and JSON files written here."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from hvpmtl.data.formats.coco import read_coco
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.loaders.coco import CocoEvalLoader, CocoTrainLoader, load_image, load_target
from hvpmtl.data.loaders.order import epoch_batches

CATS = [{"id": 7, "name": "square"}, {"id": 3, "name": "bar"}]  # not contiguous, not sorted


def rect_poly(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def write_split(root, num_images=7, size=(48, 64), extra_anns=(), extra_images=(), mutate=None):
    """num_images JPEGs (h, w = size) with ids 10, 20, ...; image k holds k % 3 rectangles (so some have none),
    each annotated by a polygon equal to its box. Returns (json path, image dir)."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    h, w = size
    images, anns = [], []
    aid = 1
    for k in range(num_images):
        iid = 10 * (k + 1)
        arr = np.full((h, w, 3), 90, np.uint8)
        arr[:, : w // 3] = 200  # asymmetric, so a flip shows
        Image.fromarray(arr).save(img_dir / f"{iid}.jpg", quality=95)
        images.append({"id": iid, "file_name": f"{iid}.jpg", "height": h, "width": w})
        for j in range(k % 3):
            x, y, bw, bh = 4 + 6 * j + k, 3 + 5 * j, 12 + 3 * j, 10 + 2 * j
            anns.append({"id": aid, "image_id": iid, "category_id": CATS[j % 2]["id"], "bbox": [x, y, bw, bh],
                         "segmentation": [rect_poly(x, y, bw, bh)], "area": bw * bh, "iscrowd": 0})
            aid += 1
    images += list(extra_images)
    anns += list(extra_anns)
    data = {"images": images, "annotations": anns, "categories": CATS}
    if mutate:
        mutate(data)
    ann_file = root / "instances_test.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, img_dir


@pytest.fixture
def split(tmp_path):
    return read_coco(*write_split(tmp_path))


# ----------------------------------------------------------------------------- reading


def test_reads_a_split_with_stable_ids_and_contiguous_labels(tmp_path):
    ann_file, img_dir = write_split(tmp_path)
    data = json.loads(ann_file.read_text())
    data["images"].reverse()  # order in the file does not matter
    ann_file.write_text(json.dumps(data))
    s = read_coco(ann_file, img_dir)
    assert s.image_ids == [10, 20, 30, 40, 50, 60, 70]
    assert [p.name for p in s.paths] == [f"{i}.jpg" for i in s.image_ids]
    assert s.category_ids == [3, 7] and s.category_names == ["bar", "square"]
    assert s.num_categories == 2 and s.num_classes == 3
    assert (s.heights[0], s.widths[0]) == (48, 64)
    # image 20 (k = 1): one rectangle of category 7 -> label 2, box xyxy
    a = s.annotations[1]
    np.testing.assert_array_equal(a.boxes, [[5, 3, 17, 13]])
    assert a.labels.tolist() == [2] and a.labels.dtype == np.int64
    # image 30 (k = 2): categories 7 and 3 -> labels 2, 1
    assert s.annotations[2].labels.tolist() == [2, 1]
    # images without annotations are kept (negatives)
    assert len(s.annotations[0].ann_ids) == 0 and len(s.annotations[3].ann_ids) == 0
    assert not s.skipped.counts
    assert len(s.coco.getAnnIds()) == len(data["annotations"])


def test_masks_and_targets_follow_the_polygons(split):
    t = load_target(split, 2)
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, 48, 64)
    for box, m in zip(t["boxes"], t["masks"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        # the mask of a rectangle polygon covers the box (pycocotools rasterises up to the far edge)
        assert abs(xs.min().item() - box[0].item()) <= 1 and abs(xs.max().item() + 1 - box[2].item()) <= 1
        assert abs(ys.min().item() - box[1].item()) <= 1 and abs(ys.max().item() + 1 - box[3].item()) <= 1
    assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32


def test_sizes_missing_from_the_json_are_read_from_the_file(tmp_path):
    def drop_sizes(d):
        for im in d["images"]:
            del im["height"], im["width"]
    s = read_coco(*write_split(tmp_path, mutate=drop_sizes))
    assert set(s.heights) == {48} and set(s.widths) == {64}
    assert s.coco.imgs[10]["height"] == 48


@pytest.mark.parametrize("case, needle", [
    ("missing-file", "99.jpg not found"),
    ("unknown-image", "image_id 12345 is not among the images"),
    ("unknown-category", "category_id 5 is not among the categories"),
    ("duplicate-image", "image id 20 appears more than once"),
    ("duplicate-annotation", "annotation id 1 appears more than once"),
    ("bad-bbox", "bbox [1, 2, 3] is not [x, y, w, h]"),
])
def test_bad_input_is_an_error_naming_file_and_id(tmp_path, case, needle):
    extra_images, extra_anns = [], []
    if case == "missing-file":
        extra_images = [{"id": 99, "file_name": "99.jpg", "height": 48, "width": 64}]
    elif case == "unknown-image":
        extra_anns = [{"id": 500, "image_id": 12345, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0}]
    elif case == "unknown-category":
        extra_anns = [{"id": 500, "image_id": 20, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 0}]
    elif case == "duplicate-image":
        extra_images = [{"id": 20, "file_name": "30.jpg", "height": 48, "width": 64}]
    elif case == "duplicate-annotation":
        extra_anns = [{"id": 1, "image_id": 30, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0,
                       "segmentation": [rect_poly(1, 1, 5, 5)]}]
    elif case == "bad-bbox":
        extra_anns = [{"id": 500, "image_id": 20, "category_id": 3, "bbox": [1, 2, 3], "iscrowd": 0}]
    ann_file, img_dir = write_split(tmp_path, extra_images=extra_images, extra_anns=extra_anns)
    with pytest.raises(DataError) as e:
        read_coco(ann_file, img_dir)
    msg = str(e.value)
    assert str(ann_file) in msg and needle in msg
    if case in ("unknown-image", "unknown-category", "bad-bbox"):
        assert "annotation 500" in msg
    if case == "missing-file":
        assert "image 99" in msg


def test_invalid_json_and_missing_sections_name_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        read_coco(bad, tmp_path)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(DataError, match=r"partial.json: not a COCO instances file: no annotations list"):
        read_coco(partial, tmp_path)
    with pytest.raises(DataError, match="nowhere.json: annotation file not found"):
        read_coco(tmp_path / "nowhere.json", tmp_path)


def test_bad_boxes_and_polygons_are_skipped_or_clipped_and_counted(tmp_path, caplog):
    extra = [
        {"id": 901, "image_id": 10, "category_id": 3, "bbox": [5, 5, 0, 8], "segmentation": [rect_poly(5, 5, 1, 8)]},
        {"id": 902, "image_id": 10, "category_id": 3, "bbox": [5, 5, 8, -2], "segmentation": [rect_poly(5, 5, 8, 2)]},
        {"id": 903, "image_id": 10, "category_id": 7, "bbox": [50, 40, 30, 20],  # reaches past 64 x 48
         "segmentation": [rect_poly(50, 40, 14, 8)]},
        {"id": 904, "image_id": 10, "category_id": 7, "bbox": [100, 100, 5, 5],  # wholly outside
         "segmentation": [rect_poly(100, 100, 5, 5)]},
        {"id": 905, "image_id": 40, "category_id": 3, "bbox": [2, 2, 9, 9], "segmentation": [[2, 2, 11, 2]]},
        {"id": 906, "image_id": 40, "category_id": 3, "bbox": [2, 2, 9, 9],  # one of two polygons too short
         "segmentation": [[2, 2, 11, 2], rect_poly(2, 2, 9, 9)]},
        {"id": 907, "image_id": 40, "category_id": 7, "bbox": [3, 3, 9, 9]},  # no segmentation
    ]
    with caplog.at_level(logging.WARNING):
        s = read_coco(*write_split(tmp_path, extra_anns=extra))
    c = s.skipped.counts
    assert c["empty-box"] == 2 and c["box-outside"] == 1 and c["clipped-box"] == 1
    assert c["short-polygon"] == 2 and c["no-polygon"] == 1 and c["no-segmentation"] == 1
    assert s.skipped.annotations_left_out == 5
    assert any("annotation 901 (image 10)" in e for e in s.skipped.examples)
    a10 = s.annotations[s.image_ids.index(10)]
    assert a10.ann_ids == [903]
    np.testing.assert_array_equal(a10.boxes, [[50, 40, 64, 48]])  # clipped to the image
    a40 = s.annotations[s.image_ids.index(40)]
    assert a40.ann_ids == [906] and a40.segmentations == [[[float(v) for v in rect_poly(2, 2, 9, 9)]]]
    # the evaluation ground truth holds what training uses, with the clipped box
    assert 901 not in s.coco.anns and 905 not in s.coco.anns and s.coco.anns[903]["bbox"] == [50, 40, 14, 8]
    assert "box with w or h <= 0" in caplog.text and str(s.ann_file) in caplog.text


def test_crowd_regions_are_counted_not_trained_on_and_kept_for_evaluation(tmp_path):
    rle = {"size": [48, 64], "counts": [48 * 10, 48 * 5, 48 * 49]}  # uncompressed RLE, columns 10..14
    crowd = {"id": 950, "image_id": 20, "category_id": 3, "bbox": [10, 0, 5, 48], "segmentation": rle, "iscrowd": 1}
    s = read_coco(*write_split(tmp_path, extra_anns=[crowd]))
    assert s.skipped.counts["crowd"] == 1
    assert 950 not in s.annotations[s.image_ids.index(20)].ann_ids
    assert s.coco.anns[950]["iscrowd"] == 1 and s.coco.anns[950]["area"] == 48 * 5
    assert s.coco.annToMask(s.coco.anns[950])[:, 10:15].all()


def test_rle_segmentations_are_used_and_must_have_the_images_size(tmp_path):
    from pycocotools import mask as mask_utils

    m = np.zeros((48, 64), np.uint8, order="F")
    m[10:20, 30:40] = 1
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode()  # compressed, as a JSON file holds it
    ann = {"id": 960, "image_id": 10, "category_id": 3, "bbox": [30, 10, 10, 10], "segmentation": rle, "iscrowd": 0}
    s = read_coco(*write_split(tmp_path / "ok", extra_anns=[ann]))
    np.testing.assert_array_equal(load_target(s, 0)["masks"][0].numpy(), m)
    assert s.coco.anns[960]["area"] == 100.0
    for crowd in (0, 1):
        wrong = {**ann, "iscrowd": crowd, "segmentation": {**rle, "size": [64, 48]}}
        with pytest.raises(DataError, match=r"annotation 960 \(image 10\): (crowd )?RLE size \[64, 48\] is not the "
                                            r"image's \[48, 64\]"):
            read_coco(*write_split(tmp_path / f"bad{crowd}", extra_anns=[wrong]))


def test_a_file_that_differs_from_its_json_size_is_an_error_naming_it(tmp_path):
    ann_file, img_dir = write_split(tmp_path)
    Image.new("RGB", (30, 20)).save(img_dir / "30.jpg")
    s = read_coco(ann_file, img_dir)
    with pytest.raises(DataError, match=r"image 30 .*30.jpg.*20x30 \(HxW\) but the JSON says 48x64"):
        load_image(s, s.image_ids.index(30))


# ----------------------------------------------------------------------------- loaders


def test_train_batches_are_rank_disjoint_and_follow_epoch_batches(tmp_path):
    s = read_coco(*write_split(tmp_path, num_images=11))
    loaders = [CocoTrainLoader(s, 2, r, 2, seed=5, flip=False) for r in range(2)]
    assert [len(x) for x in loaders] == [2, 2]  # 11 // (2 x 2)
    seen = []
    for r, ld in enumerate(loaders):
        ids = [i for b in ld for i in b["image_ids"]]
        expect = epoch_batches(11, 2, 2, r, 5, 0).reshape(-1)
        assert ids == [s.image_ids[i] for i in expect]
        seen.append(set(ids))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8
    b = next(iter(loaders[0]))
    assert all(im.dtype == torch.float32 and 0 <= im.min() and im.max() <= 1 for im in b["images"])
    loaders[0].set_epoch(1)
    assert [i for b in loaders[0] for i in b["image_ids"]] != [s.image_ids[i] for i in
                                                               epoch_batches(11, 2, 2, 0, 5, 0).reshape(-1)]


def test_eval_covers_every_image_once_over_two_ranks(tmp_path):
    s = read_coco(*write_split(tmp_path, num_images=7))
    got = []
    for r in range(2):
        ld = CocoEvalLoader(s, 2, r, 2)
        batches = list(ld)
        assert len(batches) == len(ld) == (2 if r == 0 else 2)  # 4 and 3 images
        got += [i for b in batches for i in b["image_ids"]]
        for b in batches:
            for iid, im in zip(b["image_ids"], b["images"]):
                k = s.image_ids.index(iid)
                assert torch.equal(im, load_image(s, k))  # no flip, no resize
    assert sorted(got) == s.image_ids and len(got) == len(set(got))


def _flat(batches):
    return [(b["image_ids"], [im.sum().item() for im in b["images"]], [t["boxes"].tolist() for t in b["targets"]])
            for b in batches]


def test_a_resumed_loader_yields_the_batches_of_an_uninterrupted_one(tmp_path):
    s = read_coco(*write_split(tmp_path, num_images=12))
    whole = CocoTrainLoader(s, 2, 1, 2, seed=3)
    whole.set_epoch(2)
    ref = _flat(list(whole))
    first = CocoTrainLoader(s, 2, 1, 2, seed=3)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    resumed = CocoTrainLoader(s, 2, 1, 2, seed=3)
    resumed.load_state_dict(state)
    assert _flat(head) + _flat(list(resumed)) == ref
    # another world size: the same images from the saved global position on
    single = CocoTrainLoader(s, 2, 0, 1, seed=3)
    single.load_state_dict(state)
    rest = [i for b in single for i in b["image_ids"]]
    perm = np.random.default_rng([3, 2]).permutation(12)
    assert rest == [s.image_ids[i] for i in perm[8:12]]
    with pytest.raises(DataError, match="seed changed"):
        CocoTrainLoader(s, 2, 1, 2, seed=4).load_state_dict(state)


def test_a_flip_moves_image_boxes_and_masks_together(tmp_path):
    s = read_coco(*write_split(tmp_path, num_images=12))
    ld = CocoTrainLoader(s, 4, 0, 1, seed=0, flip=True)
    flipped = kept = 0
    for b in ld:
        for iid, im, t in zip(b["image_ids"], b["images"], b["targets"]):
            k = s.image_ids.index(iid)
            orig, ot = load_image(s, k), load_target(s, k)
            if torch.equal(im, orig):
                kept += 1
                assert torch.equal(t["masks"], ot["masks"]) and torch.equal(t["boxes"], ot["boxes"])
                continue
            flipped += 1
            assert torch.equal(im, orig.flip(-1))
            assert torch.equal(t["masks"], ot["masks"].flip(-1)) and torch.equal(t["labels"], ot["labels"])
            w = im.shape[-1]
            for box, obox, m in zip(t["boxes"], ot["boxes"], t["masks"]):
                assert box.tolist() == [w - obox[2].item(), obox[1].item(), w - obox[0].item(), obox[3].item()]
                xs = torch.nonzero(m, as_tuple=True)[1]  # the flipped mask still lies in the flipped box
                assert box[0] - 1 <= xs.min() and xs.max() + 1 <= box[2] + 1
    assert flipped > 0 and kept > 0
