"""Config validation: every error names the key and the file; overrides and inheritance work."""
from pathlib import Path

import pytest

from hvpmtl.config import ConfigError, ExperimentConfig, check_batch_sizes, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if path.name.startswith("finetune"):
        return  # fine-tuning configs have their own schema (tests/eval)
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)


def test_paper_recipe_values():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/pretrain_swin_b.yaml")
    ob = cfg.objectives
    assert (ob.asl.weight, ob.swav.weight, ob.mim.weight, ob.distill.weight) == (0.001, 0.02, 1.0, 10.0)
    assert (ob.asl.eta, ob.asl.gamma_pos, ob.asl.gamma_neg) == (10.0, 4.0, 1.0)
    assert ob.swav.t_max == 10.0 and ob.distill.momentum == 0.995
    assert cfg.optim.lr == 1e-4 and cfg.optim.min_lr == 1e-7 and cfg.optim.weight_decay == 0.05
    assert cfg.optim.warmup_epochs == 5 and cfg.optim.epochs == 30 and cfg.optim.global_batch_size == 1024
    assert cfg.data.num_classes == 11166


@pytest.mark.parametrize("name", ["pretrain_swin_b.yaml", "pretrain_vit_b.yaml", "ablations/no_mim.yaml"])
def test_paper_configs_keep_swav_off_the_uniform_point(name):
    """docs/DESIGN.md: SwAV's head, 1024 + 3072 = 4096 rows per Sinkhorn for 3000 prototypes, as in SwAV's runs."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    sw = cfg.objectives.swav
    assert cfg.model.proto_head_norm == "batchnorm" and cfg.model.num_prototypes == 3000
    assert sw.queue_length == 3 * cfg.optim.global_batch_size and sw.queue_length + 1024 >= 4096
    assert check_batch_sizes(cfg, 64) == 1024 and cfg.model.proto_out_dim < cfg.model.num_prototypes
    assert 0 < sw.freeze_prototypes_steps <= sw.queue_start_step


def _write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ("optim:\n  lrr: 1e-4\n", "unknown key 'optim.lrr'"),
    ("optimm:\n  lr: 1e-4\n", "unknown key 'optimm'"),
    ("optim:\n  lr: fast\n", "'optim.lr' must be a number"),
    ("optim:\n  micro_batch_size: 1.5\n", "'optim.micro_batch_size' must be an integer"),
    ("objectives:\n  mim:\n    enabled: yes please\n", "'objectives.mim.enabled' must be true or false"),
    ("optim:\n  lr: -1\n", "'optim.lr' must be a positive number"),
    ("data:\n  mask_ratio: 1.5\n", "'data.mask_ratio' must be in (0, 1)"),
    ("model:\n  backbone: resnet50\n", "'model.backbone' must be a timm Swin or ViT"),
    ("model:\n  img_size: 100\ndata:\n  img_size: 100\n", "'model.img_size' must be a positive multiple"),
    ("objectives:\n  asl: {enabled: false}\n  swav: {enabled: false}\n  mim: {enabled: false}\n"
     "  distill: {enabled: false}\n", "at least one objective"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("optim: [1, 2\n", "not valid YAML"),
    ("objectives:\n  swav: {view1: sideways}\n", "'objectives.swav.view1' must be masked or unmasked"),
    ("model:\n  proto_head_norm: groupnorm\n", "'model.proto_head_norm' must be layernorm or batchnorm"),
    ("run:\n  collapse_warn_steps: -1\n", "'run.collapse_warn_steps' must be >= 0"),
])
def test_errors_name_key_and_file(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)
    assert str(p) in str(e.value)


def test_overrides_and_their_errors(tmp_path):
    p = _write(tmp_path, "optim:\n  lr: 1e-4\n")
    cfg = load_config(p, ["optim.lr=2e-4", "objectives.mim.enabled=false", "data.crop_scale=[0.5, 1.0]"])
    assert cfg.optim.lr == 2e-4 and cfg.objectives.mim.enabled is False and cfg.data.crop_scale == [0.5, 1.0]
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_config(p, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(p, ["optim.lr"])


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 3.0e-4\n  epochs: 7\n")
    p = _write(tmp_path, "base: base.yaml\noptim:\n  epochs: 9\n")
    cfg = load_config(p)
    assert cfg.optim.lr == 3e-4 and cfg.optim.epochs == 9


def test_batch_size_product_checked():
    cfg = load_config(None, ["optim.micro_batch_size=16", "optim.grad_accum_steps=2", "optim.global_batch_size=1024"])
    assert check_batch_sizes(cfg, 32) == 1024
    with pytest.raises(ConfigError, match=r"global_batch_size=1024 but micro_batch_size \(16\) x grad_accum_steps "
                                          r"\(2\) x world size \(8\) = 256; set optim.grad_accum_steps=8"):
        check_batch_sizes(cfg, 8)


def test_swav_queue_is_a_multiple_of_the_global_batch():
    cfg = load_config(None, ["optim.micro_batch_size=16", "objectives.swav.queue_length=3072"])
    assert check_batch_sizes(cfg, 64) == 1024
    with pytest.raises(ConfigError, match=r"queue_length=3072 must be a multiple of the global batch \(1280\)"):
        check_batch_sizes(cfg, 80)
    check_batch_sizes(load_config(None, ["optim.micro_batch_size=16", "objectives.swav.queue_length=3072",
                                         "objectives.swav.enabled=false"]), 80)  # no SwAV, no queue
