"""Detection + instance segmentation fine-tuning through launchers/finetune.py and real DeepSpeed: the synthetic
scenes' objects as COCO instances (non-contiguous category ids), Mask R-CNN on the exported tiny backbone, box and
mask AP of both ranks' detections equal to pycocotools' COCOeval run here on the exported model's detections of
every val image, and an exact resume."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import load_file
from subprocs import free_port, subprocess_env

from dense_runs import ROOT, final_eval, preempt_then_resume, sets

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs/det_demo.yaml"
SIZES = {"data.min_sizes": "[96,128]", "data.max_size": 192, "data.test_size": 128, "model.img_size": 64,
         "model.fpn_channels": 32, "model.rpn_proposals": 64, "model.roi_samples": 64}


def _sets(dense, out, init, **more):
    return sets({"data.train_ann": dense["coco_train_ann"], "data.train_images": dense["coco_train_images"],
                 "data.val_ann": dense["coco_val_ann"], "data.val_images": dense["coco_val_images"], **SIZES,
                 "optim.epochs": 2, "optim.micro_batch_size": 2, "run.output_dir": out,
                 "run.ds_config": ROOT / "ds_configs/zero2.json", "run.log_every": 1,
                 **({"model.init": init} if init else {"model.random_init": "true"}), **more})


def _cocoeval_of_export(out: Path, dense: dict) -> dict:
    """The exported detector on every val image in one process; AP by pycocotools' COCOeval, called here."""
    from hvpmtl.data.formats.coco import read_coco
    from hvpmtl.data.loaders.coco import load_image
    from hvpmtl.models.detector import build_maskrcnn
    from pycocotools import mask as mask_utils

    split = read_coco(dense["coco_val_ann"], dense["coco_val_images"])
    model = build_maskrcnn("vit_tiny_patch16_224", split.num_classes, img_size=64, min_size=(128,), max_size=192,
                           fpn_channels=32, rpn_post_nms_top_n_test=64, rpn_pre_nms_top_n_test=64)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    model.eval()
    results = []
    with torch.no_grad():
        for i, image_id in enumerate(split.image_ids):
            o = model([load_image(split, i)])[0]
            masks = (o["masks"][:, 0] >= 0.5).numpy().astype(np.uint8)
            for j in range(len(o["labels"])):
                x1, y1, x2, y2 = o["boxes"][j].tolist()
                rle = mask_utils.encode(np.asfortranarray(masks[j]))
                results.append({"image_id": image_id, "category_id": split.category_ids[int(o["labels"][j]) - 1],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(o["scores"][j]),
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(dense["coco_val_ann"])
    out_ = {}
    for kind in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(results), kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out_[f"eval/{kind}_AP"], out_[f"eval/{kind}_AP50"] = 100 * ev.stats[0], 100 * ev.stats[1]
    return out_


def test_two_ranks_log_cocoeval_of_every_val_image_from_the_exported_backbone(dense, exported_tiny, tmp_path, launch):
    out = tmp_path / "det"
    db = f"sqlite:///{tmp_path}/mlflow.db"
    code, log = launch([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "launchers/finetune.py"),
                        "--config", str(CONFIG), *_sets(dense, out, exported_tiny, **{"tracking.tracking_uri": db})],
                       cwd=tmp_path, timeout=900)
    assert code == 0, log[-4000:]
    assert f"backbone from {exported_tiny}:" in log and ", 0 missing" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/bbox_AP" in r]
    assert [r["epoch"] for r in evals] == [0, 1] and [r["step"] for r in evals] == [2, 4]  # 8 images / (2 x 2)
    assert all("eval/segm_AP" in r and "eval/bbox_AP75" in r for r in evals)
    assert {"train/classifier", "train/mask", "train/objectness"} <= set(rows[0])  # torchvision's loss terms
    ref = _cocoeval_of_export(out, dense)
    for k, v in ref.items():
        assert evals[-1][k] == pytest.approx(v, abs=1e-6), k
    classes = json.loads((out / "classes.json").read_text())
    assert len(classes) == 8 and "circle" in classes
    client = MlflowClient(db)
    run = client.search_runs([client.get_experiment_by_name("hvpmtl-finetune").experiment_id])[0]
    for k in ("eval/bbox_AP", "eval/segm_AP"):
        assert run.data.metrics[k] == pytest.approx(evals[-1][k])
    assert any(a.path.startswith("panels") for a in client.list_artifacts(run.info.run_id))


def test_a_preempted_run_resumes_to_the_same_ap(dense, tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")  # not this process's own rendezvous
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cmd = [sys.executable, str(ROOT / "launchers/finetune.py"), "--config", str(CONFIG)]
    done = subprocess.run(cmd + _sets(dense, whole, None, **{"tracking.enabled": "false"}), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    preempt_then_resume(cmd + _sets(dense, cut, None, **{"tracking.enabled": "false"}), cut, tmp_path, env)
    a, b = final_eval(whole, "eval/bbox_AP"), final_eval(cut, "eval/bbox_AP")
    assert a["step"] == b["step"]
    for k in ("eval/bbox_AP", "eval/segm_AP", "eval/bbox_AP50"):
        assert b[k] == pytest.approx(a[k], abs=1e-6), k
