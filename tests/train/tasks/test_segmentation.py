"""Semantic segmentation fine-tuning through launchers/finetune.py and real DeepSpeed: the ADE20K-layout data of
the synthetic scenes, UperNet on the exported tiny backbone, mIoU/mAcc/aAcc from one confusion matrix over both
ranks equal to a float64 reference computed from the exported model in one process, and an exact resume."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from subprocs import free_port, subprocess_env

from dense_runs import ROOT, final_eval, preempt_then_resume, sets

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs/seg_demo.yaml"


def _sets(dense, out, init, **more):
    return sets({"data.root": dense["ade20k_root"], "model.img_size": 64, "data.crop_size": 64,
                 "data.base_size": "[128,64]", "model.decoder_channels": 32, "optim.epochs": 2,
                 "optim.micro_batch_size": 2, "run.output_dir": out, "run.ds_config": ROOT / "ds_configs/zero2.json",
                 "run.log_every": 1, **({"model.init": init} if init else {"model.random_init": "true"}), **more})


def _reference_scores(out: Path, dense: dict) -> dict:
    """The exported segmenter on every validation image in one process; the scores from the (prediction, label)
    pixel pairs in float64, written independently of hvpmtl.seg_metrics (mmseg's definitions)."""
    from hvpmtl.data.formats.ade20k import read_ade20k
    from hvpmtl.data.loaders.ade20k import SegEvalLoader
    from hvpmtl.models.segmenter import build_upernet

    model = build_upernet("vit_tiny_patch16_224", 8, img_size=64, decoder_channels=32, aux_head=True)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    model.eval()
    split = read_ade20k(dense["ade20k_root"], "validation", 8)
    inter, union, label_area = (np.zeros(8, np.float64) for _ in range(3))
    correct = labelled = 0.0
    with torch.no_grad():
        for b in SegEvalLoader(split, 1, 0, 1, short_side=64, max_long_side=128):
            h, w = (int(v) for v in b["size"][0])
            logits = model(b["image"])[:, :, :h, :w]
            label = b["label"][0].numpy()
            pred = torch.nn.functional.interpolate(logits, size=label.shape, mode="bilinear",
                                                   align_corners=False).argmax(1)[0].numpy()
            valid = label != 255
            p, t = pred[valid], label[valid]
            for c in range(8):
                inter[c] += np.sum((p == c) & (t == c))
                union[c] += np.sum((p == c) | (t == c))
                label_area[c] += np.sum(t == c)
            correct += float(np.sum(p == t))
            labelled += float(valid.sum())
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    acc = np.where(label_area > 0, inter / np.maximum(label_area, 1), np.nan)
    return {"eval/mIoU": 100 * np.nanmean(iou), "eval/mAcc": 100 * np.nanmean(acc),
            "eval/aAcc": 100 * correct / labelled}


def test_two_ranks_log_the_scores_of_every_val_image_from_the_exported_backbone(dense, exported_tiny, tmp_path,
                                                                                  launch):
    out = tmp_path / "seg"
    db = f"sqlite:///{tmp_path}/mlflow.db"
    code, log = launch([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "launchers/finetune.py"),
                        "--config", str(CONFIG), *_sets(dense, out, exported_tiny, **{"tracking.tracking_uri": db})],
                       cwd=tmp_path)
    assert code == 0, log[-4000:]
    assert f"backbone from {exported_tiny}:" in log and ", 0 missing" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/mIoU" in r]
    assert [r["epoch"] for r in evals] == [0, 1] and [r["step"] for r in evals] == [2, 4]  # 8 crops / (2 x 2)
    assert evals[-1]["eval/best_mIoU"] == max(r["eval/mIoU"] for r in evals)
    ref = _reference_scores(out, dense)
    for k, v in ref.items():
        assert evals[-1][k] == pytest.approx(v, abs=1e-6), k
    assert json.loads((out / "classes.json").read_text())[:2] == ["circle", "ring"]
    client = MlflowClient(db)
    run = client.search_runs([client.get_experiment_by_name("hvpmtl-finetune").experiment_id])[0]
    for k in ("eval/mIoU", "eval/mAcc", "eval/aAcc"):
        assert run.data.metrics[k] == pytest.approx(evals[-1][k])
    assert any(a.path.startswith("panels") for a in client.list_artifacts(run.info.run_id))


def test_a_preempted_run_resumes_to_the_same_scores(dense, tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")  # not this process's own rendezvous
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cmd = [sys.executable, str(ROOT / "launchers/finetune.py"), "--config", str(CONFIG)]
    done = subprocess.run(cmd + _sets(dense, whole, None, **{"tracking.enabled": "false"}), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    preempt_then_resume(cmd + _sets(dense, cut, None, **{"tracking.enabled": "false"}), cut, tmp_path, env)
    a, b = final_eval(whole, "eval/mIoU"), final_eval(cut, "eval/mIoU")
    assert a["step"] == b["step"]
    for k in ("eval/mIoU", "eval/mAcc", "eval/aAcc"):
        assert b[k] == pytest.approx(a[k], abs=1e-6), k
