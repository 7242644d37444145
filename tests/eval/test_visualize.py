"""MLflow image panels: logged by the engine as artifacts of its run; heads that are off are skipped;
un-normalisation and the metrics reader checked on hand-made inputs."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from hvpmtl.config import load_config
from hvpmtl.eval.visualize import (IMAGENET_MEAN, IMAGENET_STD, LINE_PX, class_names, code_assignments, codes_panel,
                                   label_predictions, labels_panel, last_swav_figures, log_panels, mim_caption,
                                   mim_panel, read_metrics, swav_health, to_uint8, whole_image_logits, whole_images)
from hvpmtl.models.collapse import collapse_figures, swav_sums
from hvpmtl.models.meta_arch import Student
from hvpmtl.train.tracking.tracker import Tracker

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 24  # the synthetic dictionary's


def _artifacts(uri, run_id, path="panels"):
    return sorted(a.path for a in MlflowClient(uri).list_artifacts(run_id, path))


def test_engine_logs_every_panel_as_mlflow_artifacts(pretrain_run):
    client = MlflowClient(pretrain_run["tracking_uri"])
    run = client.search_runs([client.get_experiment_by_name("hvpmtl").experiment_id])[0]
    names = _artifacts(pretrain_run["tracking_uri"], run.info.run_id)
    assert names == ["panels/labels_step_000002.json", "panels/labels_step_000002.png",
                     "panels/losses_step_000002.png", "panels/mim_step_000002.png",
                     "panels/swav_codes_step_000002.png"]
    local = client.download_artifacts(run.info.run_id, "panels", str(pretrain_run["cwd"] / "dl"))
    mim = Image.open(f"{local}/mim_step_000002.png")
    assert mim.width > 4 * 128 and mim.height > 4 * (128 + 2)  # 4 rows of >= 128 px tiles for 64 px crops + caption
    labels = json.loads(open(f"{local}/labels_step_000002.json").read())
    assert len(labels["samples"]) == 4 and all(len(s["predicted"]) == 5 for s in labels["samples"])
    assert labels["shown"] == "training crop"  # configs/test_tiny.yaml trains on tensors: no whole image to show
    names = {n for s in labels["samples"] for n, _ in s["predicted"]}
    assert names & {"circle", "square", "red", "crowded scene", "patterned"}  # names from data.dictionary


def test_to_uint8_inverts_imagenet_normalisation():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.float64)
    x = (rgb / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    out = to_uint8(torch.from_numpy(x).permute(0, 3, 1, 2).float())
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 1


def test_read_metrics_keeps_the_last_value_per_step(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join([json.dumps({"step": 1, "loss": 3.0, "mim": 1.0}), json.dumps({"step": 2, "loss": 2.0}),
                            json.dumps({"step": 2, "loss": 1.5}), json.dumps({"step": 2, "eval/knn_map": 5}),
                            '{"step": 3, "lo']))  # a line being written
    s = read_metrics(f)
    assert s["loss"] == ([1, 2], [3.0, 1.5]) and s["mim"] == ([1], [1.0]) and "eval/knn_map" not in s


def test_switched_off_heads_are_skipped_and_mode_restored(tmp_path):
    cfg = load_config(ROOT / "configs/test_tiny.yaml", [
        f"run.output_dir={tmp_path / 'run'}", "objectives.asl.enabled=false", "objectives.swav.enabled=false",
        "objectives.distill.enabled=false", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    torch.manual_seed(0)
    student = Student(cfg).train()
    assert student.label_decoder is None and student.prototype_head is None
    g = torch.Generator().manual_seed(0)
    batch = {"view1": torch.randn(3, 3, 64, 64, generator=g), "view2": torch.randn(3, 3, 64, 64, generator=g),
             "mask": torch.rand(3, 4, 4, generator=g) > 0.5, "labels": torch.zeros(3, 8), "index": torch.arange(3)}
    tracker = Tracker(cfg, active=True)
    tracker.log_metrics({"loss": 1.0, "mim": 1.0}, 1)
    logged = log_panels(tracker, student, batch, cfg, step=7)
    tracker.close()
    assert student.training
    assert logged == ["panels/mim_step_000007.png", "panels/losses_step_000007.png"]
    assert _artifacts(f"sqlite:///{tmp_path}/m.db", tracker.run_id) == sorted(logged)


def test_collapsed_prototype_scores_give_one_bar():
    cfg = load_config(ROOT / "configs/test_tiny.yaml")
    torch.manual_seed(0)
    student = Student(cfg).eval()
    v = torch.randn(1, 3, 64, 64).expand(6, -1, -1, -1)  # every view the same image: collapsed embeddings
    counts = code_assignments(student, v, v)
    assert counts["scores"].sum() == 12 and counts["scores"].max() == 12
    assert counts["codes"].sum() == 12
    varied = code_assignments(student, torch.randn(6, 3, 64, 64) * 3, torch.randn(6, 3, 64, 64) * 3)
    assert varied["scores"].sum() == 12 and varied["scores"].max() < 12
    # Sinkhorn spreads distinct views over the prototypes
    assert (varied["codes"] > 0).sum() >= 4


def _views(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g) * 3, torch.randn(n, 3, 64, 64, generator=g) * 3


def test_swav_panel_cannot_look_healthy_while_the_codes_are_uniform(tmp_path):
    """Issue 13.3: the demo's panel said "11/64 prototypes used" (16 views spread by Sinkhorn's equipartition)
    while SwAV sat at ln K. The verdict follows the step's global-batch figures from metrics.jsonl."""
    cfg = load_config(ROOT / "configs/test_tiny.yaml")
    d = cfg.model.proto_out_dim
    dead = {"step": 40.0, "swav/code_entropy": 0.999, "swav/pred_entropy": 1.0, "swav/protos_used": 33.0,
            "swav/z_std": 0.5 / math.sqrt(d), "swav/z_rank": 1.4}
    spread_panel = {"swav/code_entropy": 0.6, "swav/pred_entropy": 0.7, "swav/protos_used": 11.0,
                    "swav/z_std": 1 / math.sqrt(d), "swav/z_rank": 8.0}
    collapsed, lines = swav_health(dead, spread_panel, d)
    assert lines[0] == "COLLAPSED (global batch of step 40): code_entropy, pred_entropy, z_rank at collapsed values"
    assert "global batch: code entropy 0.999" in lines[1] and "panel views: code entropy 0.600" in lines[2]
    healthy = dict(dead, **{"swav/code_entropy": 0.55, "swav/pred_entropy": 0.8, "swav/z_rank": 5.0,
                            "swav/z_std": 1 / math.sqrt(d)})
    assert swav_health(healthy, spread_panel, d)[0] is False
    img = codes_panel({"codes": np.ones(16, int), "scores": np.ones(16, int)}, 40, (collapsed, lines))
    assert img.height > 450  # room for the figures' lines

    # the figures come from the last step of metrics.jsonl that has them
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [dict(healthy, step=39), {"step": 40, "eval/knn_map": 1.0},
                                                    dict(dead, step=40, loss=1.0)]) + '\n{"step": 41, "swa')
    assert last_swav_figures(f) == dead and last_swav_figures(tmp_path / "none.jsonl") == {}


def test_swav_panel_figures_of_a_collapsed_head():
    """With no training figures (a panel drawn from the student alone), the panel views' own figures decide."""
    cfg = load_config(ROOT / "configs/test_tiny.yaml")
    torch.manual_seed(0)
    student = Student(cfg).eval()
    student.prototype_head.mlp.register_forward_hook(lambda mod, args, out: out * 0 + 1)  # one embedding for all
    v1, v2 = _views()
    out = student.inspect(v1, v2, None)
    panel = collapse_figures(swav_sums(out["scores"], out["codes"], out["z"], cfg.objectives.swav.temperature))
    collapsed, lines = swav_health({}, panel, cfg.model.proto_out_dim)
    assert collapsed and lines[0].startswith("COLLAPSED (panel views only)") and "protos_used" in lines[0]


def test_the_mim_panel_says_what_to_expect_at_a_short_budget():
    v, rec = torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    plain, captioned = mim_panel(v, mask, rec), mim_panel(v, mask, rec, step=100)
    lines = mim_caption(100, captioned.width)
    text = " ".join(lines)
    assert "step 100" in text and "grey" in text and "expected" in text
    assert captioned.height == plain.height + len(lines) * LINE_PX + 6
    assert (np.asarray(captioned)[:len(lines) * LINE_PX] < 100).any()  # the caption is drawn above the tiles


def test_the_labels_panel_shows_the_whole_image_its_labels_belong_to(syn, tmp_path):
    """Issue 21: under a random crop, the scene's true labels named objects the crop had cut away."""
    from hvpmtl.data.loaders.pretrain import build_pretrain_loader

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(ROOT / "configs/test_tiny.yaml", [
        "data.format=tencent", f"data.root={syn['root']}", f"data.list_file={syn['list_file']}",
        f"data.dictionary={syn['dictionary']}", f"data.num_classes={NUM_CLASSES}", "data.device=cpu",
        f"run.output_dir={tmp_path / 'run'}", f"tracking.tracking_uri={uri}"])
    loader = build_pretrain_loader(cfg.data, batch_size=4, patch_size=16, rank=0, world_size=1, local_rank=0, seed=0)
    ids = [3, 5]
    whole = whole_images(loader, ids)
    for i, im in zip(ids, whole):  # the files as listed, whole: not square, so no square crop could hold them
        with Image.open(Path(syn["root"]) / loader.labels.path(i)) as ref:
            assert im.size == ref.size and im.width != im.height
            assert np.array_equal(np.asarray(im), np.asarray(ref.convert("RGB")))
    torch.manual_seed(0)
    student = Student(cfg).train()
    g = torch.Generator().manual_seed(0)
    labels = loader.table.dense(torch.tensor(ids))
    batch = {"view1": torch.randn(2, 3, 64, 64, generator=g), "view2": torch.randn(2, 3, 64, 64, generator=g),
             "mask": torch.rand(2, 4, 4, generator=g) > 0.5, "labels": labels, "index": torch.tensor(ids)}
    tracker = Tracker(cfg, active=True)
    logged = log_panels(tracker, student, batch, cfg, step=5, whole=whole)
    tracker.close()
    assert student.training and "panels/labels_step_000005.png" in logged
    got = json.loads((tmp_path / "run" / "panels" / "labels_step_000005.json").read_text())
    assert got["shown"] == "whole image"
    student.eval()
    want = label_predictions(whole_image_logits(student, whole, 64), labels, class_names(cfg))  # on the whole image
    assert got["samples"] == json.loads(json.dumps(want))
    # each thumbnail is the whole image at its own aspect ratio (128 px on the longer side)
    panel = labels_panel(whole, want)
    w, h = 128, round(128 * whole[0].height / whole[0].width)
    thumb = np.asarray(panel.crop((0, 0, w, h)), np.int16)
    assert np.abs(thumb - np.asarray(whole[0].resize((w, h), Image.BILINEAR), np.int16)).max() == 0
