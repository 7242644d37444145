"""`hvpmtl export` from a real engine checkpoint: every format loads back into timm and gives the
features of the checkpoint's own backbone."""
import json
import logging
import pickle
import shutil

import pytest
import timm
import torch
from safetensors import safe_open

from hvpmtl.cli import main as hvpmtl_main
from hvpmtl.config import load_config
from hvpmtl.eval.export import ExportError, export_run, find_checkpoint, read_backbone_file, read_run_backbone
from hvpmtl.models.backbone import MaskableBackbone


def _source_backbone(run_dir, key):
    """The checkpoint's MaskableBackbone (teacher from the client state, or the student's module)."""
    cfg = load_config(run_dir / "config.yaml")
    ckpt = torch.load(find_checkpoint(run_dir) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    sd = ckpt["teacher"] if key == "teacher" else ckpt["module"]
    bb = MaskableBackbone(cfg.model.backbone, cfg.model.img_size)
    bb.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
    return bb.eval(), cfg


def _timm_features(model, x):
    """timm's own forward: patch tokens after the final norm, as [B, H, W, D]."""
    t = model.forward_features(x)[:, model.num_prefix_tokens:]
    side = int(t.shape[1] ** 0.5)
    return t.reshape(x.shape[0], side, side, -1)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_timm_format_loads_with_no_missing_or_unexpected_key(pretrain_run, tmp_path, x, caplog, which):
    run_dir = pretrain_run["dir"]
    out = export_run(run_dir, tmp_path / "bb.safetensors", "timm", which=which)
    src, cfg = _source_backbone(run_dir, which)
    caplog.set_level(logging.INFO, logger="timm")
    model = timm.create_model(cfg.model.backbone, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              num_classes=0, img_size=cfg.model.img_size).eval()
    assert "Loading pretrained weights from file" in caplog.text
    assert "Missing keys" not in caplog.text and "Unexpected keys" not in caplog.text
    # and strictly, outside timm's loader
    strict = timm.create_model(cfg.model.backbone, pretrained=False, num_classes=0, img_size=cfg.model.img_size)
    state, meta = read_backbone_file(out)
    strict.load_state_dict(state, strict=True)
    assert meta["timm_model"] == cfg.model.backbone and meta["img_size"] == str(cfg.model.img_size)
    assert meta["which"] == which
    with torch.no_grad():
        torch.testing.assert_close(_timm_features(model, x), src(x), rtol=0, atol=1e-5)


def test_teacher_differs_from_student(pretrain_run):
    t, _, ti = read_run_backbone(pretrain_run["dir"], which="teacher")
    s, _, si = read_run_backbone(pretrain_run["dir"], which="student")
    assert ti["which"] == "teacher" and si["which"] == "student"
    assert read_run_backbone(pretrain_run["dir"])[2]["which"] == "teacher"  # auto: distillation ran
    assert t.keys() == s.keys()
    assert any(not torch.equal(t[k], s[k]) for k in t)  # EMA lags the student


@pytest.mark.parametrize("fmt,suffix", [("mmdet", ".pth"), ("mmseg", ".pth"), ("detectron2", ".pth"),
                                        ("detectron2", ".pkl")])
def test_framework_formats_give_the_same_features(pretrain_run, tmp_path, x, fmt, suffix):
    run_dir = pretrain_run["dir"]
    out = export_run(run_dir, tmp_path / f"bb{suffix}", fmt)
    src, cfg = _source_backbone(run_dir, "teacher")
    if suffix == ".pkl":
        with open(out, "rb") as f:
            obj = pickle.load(f)
    else:
        obj = torch.load(out, map_location="cpu", weights_only=False)
    if fmt == "detectron2":
        assert obj["__author__"] == "hvpmtl" and obj["matching_heuristics"] is True
        state, prefix = obj["model"], ""
    else:
        state, prefix = obj["state_dict"], "backbone.timm_model."
        assert obj["meta"]["hvpmtl"]["timm_model"] == cfg.model.backbone
    assert all(k.startswith(prefix) for k in state)
    model = timm.create_model(cfg.model.backbone, pretrained=False, num_classes=0, img_size=cfg.model.img_size).eval()
    model.load_state_dict({k[len(prefix):]: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(_timm_features(model, x), src(x), rtol=0, atol=1e-5)


def test_mmdet_custom_prefix_and_features_only(pretrain_run, tmp_path, x):
    run_dir = pretrain_run["dir"]
    src, cfg = _source_backbone(run_dir, "teacher")
    out = export_run(run_dir, tmp_path / "p.pth", "mmdet", prefix="backbone.")
    assert all(k.startswith("backbone.") and not k.startswith("backbone.timm_model.")
               for k in torch.load(out, weights_only=False)["state_dict"])
    # features_only: the keys of timm's features_only wrapper, loaded strictly; its last map is the
    # last block's output (before the final norm) of the plain model
    out = export_run(run_dir, tmp_path / "f.pth", "mmdet", features_only=True)
    sd = torch.load(out, weights_only=False)["state_dict"]
    fo = timm.create_model(cfg.model.backbone, pretrained=False, features_only=True, img_size=cfg.model.img_size)
    fo.load_state_dict({k[len("backbone.timm_model."):]: v for k, v in sd.items()}, strict=True)
    fo.eval()
    plain = src.model
    with torch.no_grad():
        last = fo(x)[-1]
        ref = plain.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
    torch.testing.assert_close(last, ref, rtol=0, atol=1e-5)
    with pytest.raises(ExportError, match="features_only"):
        read_backbone_file(out)


def test_export_cli_and_errors(pretrain_run, tmp_path, capsys):
    run_dir = pretrain_run["dir"]
    out = tmp_path / "cli.safetensors"
    assert hvpmtl_main(["export", "--run-dir", str(run_dir), "--format", "timm", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["checkpoint"] == find_checkpoint(run_dir).name
    # a run without a teacher (distillation off) cannot export one
    copy = tmp_path / "run_copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*optim_states*"))
    tag = copy / "checkpoints" / find_checkpoint(run_dir).name
    f = tag / "mp_rank_00_model_states.pt"
    ckpt = torch.load(f, weights_only=False)
    ckpt["teacher"] = None
    torch.save(ckpt, f)
    manifest = json.loads((tag / "COMPLETE").read_text())
    manifest["files"] = {k: (tag / k).stat().st_size for k in manifest["files"] if (tag / k).exists()}
    (tag / "COMPLETE").write_text(json.dumps(manifest))
    assert read_run_backbone(copy)[2]["which"] == "student"
    assert hvpmtl_main(["export", "--run-dir", str(copy), "--which", "teacher", "--format", "timm",
                        "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "no teacher" in capsys.readouterr().err
    # an incomplete checkpoint is refused, naming it
    (tag / "COMPLETE").unlink()
    with pytest.raises(ExportError, match="no complete checkpoint"):
        read_run_backbone(copy)
    with pytest.raises(ExportError, match="interrupted"):
        read_run_backbone(copy, checkpoint=tag)
    with pytest.raises(ExportError, match="no config.yaml"):
        read_run_backbone(tmp_path)
    with pytest.raises(ExportError, match="takes no --prefix"):
        export_run(run_dir, tmp_path / "x.safetensors", "timm", prefix="a.")
