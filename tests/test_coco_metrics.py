"""hvpmtl.coco_metrics against pycocotools' COCOeval run directly, on a hand-made ground truth."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hvpmtl.coco_metrics import coco_ap, gather_results, metric_names, to_coco_results

H, W = 40, 50
CATEGORY_IDS = [2, 5]  # labels 1, 2


def rect(x, y, w, h):
    return [float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)]


def ground_truth() -> COCO:
    """3 images; small (< 32^2) and medium objects of two categories, and one crowd region."""
    objects = {1: [(2, 2, 10, 8, 2), (20, 5, 36, 34, 5)],  # (x, y, w, h, category)
               2: [(5, 10, 12, 12, 5), (25, 20, 14, 9, 2), (1, 1, 6, 6, 2)],
               3: [(8, 4, 30, 35, 2)]}
    anns, aid = [], 1
    for iid, objs in objects.items():
        for x, y, w, h, c in objs:
            anns.append({"id": aid, "image_id": iid, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": 0, "segmentation": [rect(x, y, w, h)]})
            aid += 1
    anns.append({"id": aid, "image_id": 3, "category_id": 5, "bbox": [40, 0, 10, 40], "area": 400, "iscrowd": 1,
                 "segmentation": mask_utils.frPyObjects(
                     {"size": [H, W], "counts": [H * 40, H * 10]}, H, W)})
    anns[-1]["segmentation"]["counts"] = anns[-1]["segmentation"]["counts"].decode()
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.jpg"} for i in objects],
                    "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in CATEGORY_IDS]}
    coco.createIndex()
    return coco


def perfect_outputs(coco: COCO) -> tuple[list[dict], list[int]]:
    outs, ids = [], []
    for iid in coco.getImgIds():
        gts = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=iid)) if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in gts], dtype=torch.float64)
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in gts])).float()[:, None]
        outs.append({"boxes": boxes.float(), "labels": torch.tensor([CATEGORY_IDS.index(a["category_id"]) + 1
                                                                     for a in gts]),
                     "scores": torch.linspace(0.9, 0.6, len(gts)), "masks": masks})
        ids.append(iid)
    return outs, ids


def noisy_outputs(coco: COCO, seed: int = 0) -> tuple[list[dict], list[int]]:
    """The perfect outputs moved by a few pixels, soft masks, some labels swapped, and false positives."""
    g = torch.Generator().manual_seed(seed)
    outs, ids = perfect_outputs(coco)
    noisy = []
    for o in outs:
        n = len(o["labels"])
        boxes = (o["boxes"] + torch.randint(-3, 4, (n, 4), generator=g)).clamp(0, W)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        masks = (o["masks"] * 0.4 + torch.rand(o["masks"].shape, generator=g) * 0.6)  # some pixels fall below 0.5
        labels = o["labels"].clone()
        labels[0] = 3 - labels[0]
        fp_box = torch.tensor([[30.0, 25.0, 48.0, 39.0]])
        fp_mask = torch.zeros(1, 1, H, W)
        fp_mask[..., 25:39, 30:48] = 0.8
        noisy.append({"boxes": torch.cat([boxes, fp_box]), "labels": torch.cat([labels, torch.tensor([1])]),
                      "scores": torch.cat([torch.rand(n, generator=g), torch.tensor([0.95])]),
                      "masks": torch.cat([masks, fp_mask])})
    return noisy, ids


def reference_results(outputs, ids):
    """The COCO result dicts written out by hand: xywh boxes, category ids, RLE of mask >= 0.5."""
    res = []
    for o, iid in zip(outputs, ids):
        for b, l, s, m in zip(o["boxes"].tolist(), o["labels"].tolist(), o["scores"].tolist(), o["masks"]):
            rle = mask_utils.encode(np.asfortranarray((m[0].numpy() >= 0.5).astype(np.uint8)))
            res.append({"image_id": iid, "category_id": CATEGORY_IDS[l - 1], "score": s,
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "segmentation": rle})
    return res


def cocoeval_directly(coco, results, iou_type):
    if iou_type == "segm":  # as Detectron2: the mask's own area decides small/medium/large
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    else:
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    ev = COCOeval(coco, coco.loadRes(results), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [v * 100 if v >= 0 else math.nan for v in ev.stats[:6]]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], abs=1e-12)
                                        for k in a)


def test_to_coco_results_converts_boxes_labels_and_masks():
    coco = ground_truth()
    outs, ids = noisy_outputs(coco)
    res = to_coco_results(outs, ids, CATEGORY_IDS)
    ref = reference_results(outs, ids)
    assert len(res) == len(ref)
    for r, e in zip(res, ref):
        assert (r["image_id"], r["category_id"]) == (e["image_id"], e["category_id"])
        assert r["bbox"] == pytest.approx(e["bbox"], abs=1e-5) and r["score"] == pytest.approx(e["score"])
        assert isinstance(r["segmentation"]["counts"], str) and r["segmentation"]["size"] == [H, W]
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), mask_utils.decode(e["segmentation"]))
    json.dumps(res)  # JSON-safe
    with pytest.raises(ValueError, match="labels must be in 1..2"):
        to_coco_results([{**outs[0], "labels": torch.zeros(len(outs[0]["labels"]), dtype=torch.int64)}], ids[:1],
                        CATEGORY_IDS)


def test_coco_ap_equals_cocoeval_run_directly(capsys):
    coco = ground_truth()
    outs, ids = noisy_outputs(coco)
    results = to_coco_results(outs, ids, CATEGORY_IDS)
    capsys.readouterr()  # the test's own COCO() printed "creating index"
    got = coco_ap(coco, results)
    assert capsys.readouterr().out == ""  # COCOeval's printing stays off the console
    assert list(got) == metric_names()
    ref = reference_results(outs, ids)
    expect = {}
    for t in ("bbox", "segm"):
        expect.update({f"{t}_{n}": v for n, v in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"),
                                                     cocoeval_directly(ground_truth(), ref, t))})
    assert same(got, expect)
    assert 0 < got["bbox_AP"] < 100 and 0 < got["segm_AP"] < 100
    assert math.isnan(got["bbox_APl"])  # no large object in the ground truth (COCOeval's -1)


def test_perfect_detections_give_100():
    coco = ground_truth()
    got = coco_ap(coco, to_coco_results(*perfect_outputs(coco), CATEGORY_IDS))
    for t in ("bbox", "segm"):
        for n in ("AP", "AP50", "AP75", "APs", "APm"):
            assert got[f"{t}_{n}"] == pytest.approx(100.0), (t, n)


def test_results_of_two_ranks_concatenated_equal_all_at_once():
    coco = ground_truth()
    outs, ids = noisy_outputs(coco, seed=3)
    whole = coco_ap(coco, to_coco_results(outs, ids, CATEGORY_IDS))
    # the eval loader's split: rank r takes images r, r+2, ...
    parts = [to_coco_results(outs[r::2], ids[r::2], CATEGORY_IDS) for r in range(2)]
    assert same(coco_ap(coco, parts[0] + parts[1]), whole)
    assert not same(coco_ap(coco, parts[0]), whole)  # one rank alone is not the answer


def test_empty_results_give_zeros_and_bad_results_are_refused():
    coco = ground_truth()
    assert coco_ap(coco, []) == {k: 0.0 for k in metric_names()}
    assert coco_ap(coco, [], iou_types=("bbox",)) == {k: 0.0 for k in metric_names(("bbox",))}
    res = to_coco_results(*perfect_outputs(coco), CATEGORY_IDS)
    with pytest.raises(ValueError, match="image ids not in the ground truth"):
        coco_ap(coco, [{**res[0], "image_id": 77}])
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in res]
    assert coco_ap(coco, boxes_only, iou_types=("bbox",))["bbox_AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="segm AP needs a 'segmentation'"):
        coco_ap(coco, boxes_only)


def test_gather_results_on_one_rank_is_the_list_itself():
    res = [{"image_id": 1}, {"image_id": 2}]
    assert gather_results(res, 1) == res


def _gather_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mine = [{"image_id": rank * 10 + k, "score": 0.5} for k in range(rank + 1)]  # ranks hold different counts
    got = gather_results(mine, world)
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(got, f)


@pytest.mark.slow
def test_gather_results_gives_every_rank_all_results_in_rank_order(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expect = [{"image_id": 0, "score": 0.5}, {"image_id": 10, "score": 0.5}, {"image_id": 11, "score": 0.5}]
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == expect


def test_end_to_end_from_a_coco_split_through_mask_rcnn(tmp_path):
    """read_coco -> CocoEvalLoader (2 simulated ranks) -> Mask R-CNN -> to_coco_results -> coco_ap: the pieces fit."""
    from PIL import Image

    from hvpmtl.data.formats.coco import read_coco
    from hvpmtl.data.loaders.coco import CocoEvalLoader
    from hvpmtl.models.detector import build_maskrcnn

    images, anns = [], []
    for k, (h, w) in enumerate([(40, 56), (48, 40), (36, 36)]):
        Image.new("RGB", (w, h), (30 * k, 90, 120)).save(tmp_path / f"{k}.jpg")
        images.append({"id": 100 + k, "file_name": f"{k}.jpg", "height": h, "width": w})
        anns.append({"id": k + 1, "image_id": 100 + k, "category_id": 9, "bbox": [4, 4, 20, 16], "iscrowd": 0,
                     "segmentation": [rect(4, 4, 20, 16)]})
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 9, "name": "x"}]}))
    split = read_coco(ann_file, tmp_path)
    torch.manual_seed(0)
    model = build_maskrcnn("vit_tiny_patch16_224", split.num_classes, min_size=(64,), max_size=96, fpn_channels=32,
                           vit_width=32, box_detections_per_img=5, box_score_thresh=0.0).eval()
    parts = []
    for rank in range(2):
        mine = []
        for batch in CocoEvalLoader(split, 2, rank, 2):
            with torch.no_grad():
                mine += to_coco_results(model(batch["images"]), batch["image_ids"], split.category_ids)
        parts.append(mine)
    results = parts[0] + parts[1]
    assert {r["image_id"] for r in results} == set(split.image_ids) and {r["category_id"] for r in results} == {9}
    for r in results:
        assert r["segmentation"]["size"] == [split.coco.imgs[r["image_id"]]["height"],
                                             split.coco.imgs[r["image_id"]]["width"]]
    got = coco_ap(split.coco, results)
    assert list(got) == metric_names() and 0 <= got["bbox_AP"] <= 100 and 0 <= got["segm_AP"] <= 100
