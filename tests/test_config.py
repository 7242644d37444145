"""Config validation: every error names the key and the file; overrides and inheritance work; the saved
copy of a run's config works from another directory."""
import os
from pathlib import Path

import pytest
import yaml

from hvpmtl.config import (PRETRAIN_FORMATS, ConfigError, ExperimentConfig, FinetuneConfig, check_batch_sizes,
                           load_config, save_config)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.joinpath("configs").rglob("*.yaml"))
# what a shipped fine-tuning config leaves to the command line (the model to start from, the data)
FINETUNE_REQUIRED = ["model.random_init=true", "data.train_dir=/data/train", "data.val_dir=/data/val"]


# the dense tasks' shipped configs: what each leaves to the command line (paper recipes) or nothing (demos)
DENSE_REQUIRED = {
    "det_": ["model.random_init=true", "data.train_ann=a.json", "data.train_images=a", "data.val_ann=b.json",
             "data.val_images=b"],
    "seg_": ["model.random_init=true", "data.root=/data/ADEChallengeData2016"],
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    dense = next((v for k, v in DENSE_REQUIRED.items() if path.name.startswith(k)), None)
    if dense is not None:
        cfg = load_config(path, dense, schema=FinetuneConfig)
        assert cfg.resolved_task == ("detection" if path.name.startswith("det_") else "segmentation")
        assert cfg.tracking.experiment == "hvpmtl-finetune"
        with pytest.raises(ConfigError, match="model.init"):
            load_config(path, dense[1:], schema=FinetuneConfig)
    elif path.name.startswith("finetune"):
        cfg = load_config(path, FINETUNE_REQUIRED, schema=FinetuneConfig)
        assert isinstance(cfg, FinetuneConfig) and cfg.tracking.experiment == "hvpmtl-finetune"
        with pytest.raises(ConfigError, match="model.init"):  # the file alone names what is missing
            load_config(path, schema=FinetuneConfig)
    else:
        cfg = load_config(path)
        assert isinstance(cfg, ExperimentConfig)


def test_simmim_finetuning_recipe_values():
    cfg = load_config(ROOT / "configs/finetune_simmim.yaml", FINETUNE_REQUIRED, schema=FinetuneConfig)
    o, m, d = cfg.optim, cfg.model, cfg.data
    assert (o.epochs, o.lr, o.lr_scale_batch, o.warmup_epochs, o.warmup_lr, o.min_lr) == (
        100, 1.25e-3, 512, 20, 2.5e-7, 2.5e-7)
    assert (o.weight_decay, o.layer_decay, o.grad_clip, o.betas) == (0.05, 0.9, 5.0, [0.9, 0.999])
    assert (m.backbone, m.img_size, m.drop_path_rate) == ("swin_base_patch4_window7_224", 224, 0.1)
    assert (d.label_smoothing, d.mixup, d.cutmix) == (0.1, 0.8, 1.0)
    tiny = load_config(ROOT / "configs/finetune_tiny.yaml", FINETUNE_REQUIRED, schema=FinetuneConfig)
    assert tiny.optim.weight_decay == 0.05 and tiny.optim.epochs == 2 and tiny.model.img_size == 64  # base: + own


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
    assert 0 < sw.freeze_prototypes_steps <= sw.queue_start_step and sw.view1 == "unmasked"


def test_demo_config_keeps_swav_off_the_uniform_point():
    """The settings docs/DESIGN.md measured to bring the demo's SwAV below 0.9 ln K (benchmarks/swav_study.py)."""
    cfg = load_config(ROOT / "configs/demo_cpu.yaml")
    sw, d = cfg.objectives.swav, cfg.data
    assert cfg.model.proto_head_norm == "batchnorm" and sw.view1 == "unmasked" and sw.epsilon == 0.03
    assert d.color_jitter == 0 and d.rand_augment_n == 0


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
    ("objectives:\n  swav: {view1: sideways}\n", "'objectives.swav.view1' must be one of 'masked' or 'unmasked'"),
    ("model:\n  proto_head_norm: groupnorm\n", "'model.proto_head_norm' must be one of 'layernorm' or 'batchnorm'"),
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


def test_data_img_size_is_model_img_size_unless_given(tmp_path):
    """Issue 20: data.img_size must equal model.img_size, so left out it is model.img_size; given, a mismatch is
    still refused naming both."""
    cfg = load_config(_write(tmp_path, "model:\n  img_size: 192\n"))
    assert cfg.data.img_size == cfg.model.img_size == 192
    assert load_config(None, ["model.img_size=96"]).data.img_size == 96
    assert ExperimentConfig(model={"img_size": 64}).data.img_size == 64
    assert load_config(None, ["model.img_size=96", "data.img_size=96"]).data.img_size == 96
    with pytest.raises(ConfigError, match=r"'data.img_size' must equal model.img_size \(192\), got 224"):
        load_config(None, ["model.img_size=192", "data.img_size=224"])
    with pytest.raises(ConfigError, match=r"'data.img_size' must equal model.img_size \(224\), got 192"):
        load_config(None, ["data.img_size=192"])
    saved = tmp_path / "saved.yaml"  # the saved copy holds the derived size and loads back the same
    save_config(load_config(None, ["model.img_size=96"]), saved)
    assert load_config(saved).data.img_size == 96


def test_optim_lr_is_the_peak_in_both_trainers(tmp_path):
    """Issue 21: one key for the peak learning rate. Fine-tuning reads optim.lr as pre-training does, scaled by the
    global batch only where optim.lr_scale_batch says so (its own key, off by default)."""
    from hvpmtl.train.finetune import peak_lr

    p = _write(tmp_path, "optim:\n  lr: 3.0e-4\n")
    ft = load_config(p, FINETUNE_REQUIRED, schema=FinetuneConfig)
    assert ft.optim.lr == 3e-4 and ft.optim.lr_scale_batch == 0 and peak_lr(ft, 1024) == 3e-4
    assert load_config(p).optim.lr == 3e-4  # the same key, the same meaning in pre-training
    scaled = load_config(p, [*FINETUNE_REQUIRED, "optim.lr_scale_batch=256"], schema=FinetuneConfig)
    assert peak_lr(scaled, 1024) == pytest.approx(1.2e-3)
    with pytest.raises(ConfigError, match="'optim.lr' must be a positive number"):
        load_config(p, [*FINETUNE_REQUIRED, "optim.lr=0"], schema=FinetuneConfig)


@pytest.mark.parametrize("schema", [FinetuneConfig, ExperimentConfig])
def test_the_old_base_lr_key_is_refused_naming_optim_lr(tmp_path, schema):
    """optim.base_lr (fine-tuning's old key, scaled by batch / 512 unless said otherwise) is refused, in a file or
    in --set, with the new key and how to keep the old LR; never read as optim.lr with another meaning."""
    required = FINETUNE_REQUIRED if schema is FinetuneConfig else []
    p = _write(tmp_path, "optim:\n  epochs: 2\n  base_lr: 1.25e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, required, schema=schema)
    msg = str(e.value)
    assert "'optim.base_lr' was renamed 'optim.lr': the peak learning rate" in msg and "(512 when not given)" in msg
    assert f"{p.name}:3)" in msg and "unknown key" not in msg
    ok = _write(tmp_path, "optim:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(ok, [*required, "optim.base_lr=1e-3"], schema=schema)
    assert "'optim.base_lr' was renamed 'optim.lr'" in str(e.value) and "from --set optim.base_lr=1e-3" in str(e.value)


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


@pytest.mark.parametrize("sets,needle", [
    # issue 10.9: each used to crash later (ZeroDivisionError, TypeError) or be accepted
    (["data.mask_patch_size=0"], "'data.mask_patch_size' must be >= 1, got 0"),
    (["model.decoder_heads=0"], "'model.decoder_heads' must be >= 1, got 0"),
    (["optim.betas=[0.9, [0.99]]"], "'optim.betas[1]' must be a number"),
    (["optim.betas=[0.9, 0.99, 0.5]"], "'optim.betas' must be [b1, b2] in [0, 1)"),
    (["optim.betas=0.9"], "'optim.betas' must be a list"),
    (["run.log_every=0"], "'run.log_every' must be >= 1, got 0"),
    (["run.eval_every=-1"], "'run.eval_every' must be >= 0, got -1"),
    (["run.eval_every=5"], "'run.eval_every' > 0 needs data.holdout_list"),
    (["data.format=imagefolder"], "'data.format' must be one of 'tencent', 'synthetic', 'shards' or 'tensors'"),
    # every other number is bounded too
    (["optim.lr=.nan"], "'optim.lr' must be a finite number"),
    (["optim.epochs=0"], "'optim.epochs' must be >= 1"),
    (["optim.warmup_epochs=40"], "'optim.warmup_epochs' must be <= optim.epochs (2)"),
    (["optim.grad_accum_steps=0"], "'optim.grad_accum_steps' must be >= 1"),
    (["objectives.swav.sinkhorn_iters=0"], "'objectives.swav.sinkhorn_iters' must be >= 1"),
    (["objectives.distill.momentum=1.0"], "'objectives.distill.momentum' must be < 1"),
    (["objectives.distill.momentum_schedule=cosine", "objectives.distill.momentum=0.99",
      "objectives.distill.momentum_end=0.9"], "'objectives.distill.momentum_end' must be >="),
    (["data.num_threads=0"], "'data.num_threads' must be >= 1"),
    (["data.rand_augment_m=31"], "'data.rand_augment_m' must be <= 30"),
    (["model.drop_path_rate=1.0"], "'model.drop_path_rate' must be < 1"),
    (["run.collective_timeout_s=0"], "'run.collective_timeout_s' must be >= 1"),
    (["run.precision=bf32"], "'run.precision' must be one of 'auto', 'bf16', 'fp16' or 'fp32'"),
    (["optim.micro_batch_size=true"], "'optim.micro_batch_size' must be an integer, got True"),
    (["model=3"], "'model' must be a mapping, got int"),
])
def test_bad_values_name_the_key(sets, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/test_tiny.yaml", sets)
    assert needle in str(e.value)
    assert "configs/test_tiny.yaml + --set" in str(e.value)


# numbers bounded by the schema's `check` (a rule over several values) instead of by their Field
CHECKED_BY_SCHEMA = {"data.mask_ratio": ["data.mask_ratio=1.0e+300"],
                     "data.crop_scale": ["data.crop_scale=[0.5, 1.0e+300]"],
                     "data.label_threshold": ["data.label_threshold=1.0e+300"],
                     "optim.betas": ["optim.betas=[0.9, 1.0e+300]"]}
DETECTION = ["task=detection", "model.random_init=true", "data.mixup=0", "data.cutmix=0", "data.train_ann=a",
             "data.train_images=i", "data.val_ann=a", "data.val_images=i"]
SEGMENTATION = ["task=segmentation", "model.random_init=true", "data.mixup=0", "data.cutmix=0", "data.root=r",
                "data.num_classes=150"]
CHECKED_BY_FT_SCHEMA = {"data.min_sizes": DETECTION + ["data.min_sizes=[100000000000000000000]"],
                        "data.scale_range": SEGMENTATION + ["data.scale_range=[0.5, 1.0e+300]"],
                        "data.base_size": SEGMENTATION + ["data.base_size=[100000000000000000000, 512]"]}


def _number_keys(cls, prefix=""):
    """(dotted key, 'int' | 'float', is a list) of every numeric key of a schema."""
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            yield from _number_keys(ann, f"{prefix}{name}.")
            continue
        text = str(ann)
        kind = "float" if "float" in text else "int" if "int" in text else None
        if kind:
            yield f"{prefix}{name}", kind, text.startswith("list")


@pytest.mark.parametrize("schema", [ExperimentConfig, FinetuneConfig], ids=lambda s: s.__name__)
def test_every_number_has_an_upper_bound(schema):
    """Issues 10.9 and 23.6: a number far beyond any physical sense (1e300, 10^20) is refused naming the key, for
    every numeric key: by its Field or, for the few listed, by the schema's check."""
    base = ROOT / ("configs/test_tiny.yaml" if schema is ExperimentConfig else "configs/finetune_tiny.yaml")
    schema_checked = CHECKED_BY_SCHEMA if schema is ExperimentConfig else CHECKED_BY_FT_SCHEMA
    keys = list(_number_keys(schema))
    assert len(keys) > 30
    for key, kind, is_list in keys:
        huge = "1.0e+300" if kind == "float" else "100000000000000000000"
        value = f"[{huge}]" if is_list else huge
        sets = schema_checked.get(key) or ([] if schema is ExperimentConfig else FINETUNE_REQUIRED) + [f"{key}={value}"]
        with pytest.raises(ConfigError) as e:
            load_config(base, sets, schema=schema)
        assert f"'{key}" in str(e.value), (key, str(e.value))


def test_base_that_includes_itself_names_the_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"'base' makes a cycle: .*a\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\noptim: {lr: 1.0e-3}\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "b.yaml")
    assert f"{tmp_path / 'b.yaml'} -> {tmp_path / 'c.yaml'} -> {tmp_path / 'b.yaml'}" in str(e.value)
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: 'base': cannot read config file .*missing\.yaml"):
        load_config(tmp_path / "d.yaml")


def test_grad_accum_steps_derived_from_the_global_batch():
    """Issue 13.2 / 19.5: the paper configs take up to 32 images per 80 GB GPU; the global batch 1024 is kept by
    accumulation only where it needs it (8 GPUs: 4 steps, 32 GPUs: none), and 64 GPUs take 16 each."""
    cfg = load_config(ROOT / "configs/pretrain_vit_b.yaml")
    assert cfg.optim.global_batch_size == 1024 and cfg.optim.grad_accum_steps is None
    assert cfg.optim.micro_batch_size == 32
    assert check_batch_sizes(cfg, 8) == 1024 and cfg.optim.grad_accum_steps == 4
    cfg = load_config(ROOT / "configs/pretrain_vit_b.yaml")
    assert check_batch_sizes(cfg, 32) == 1024 and cfg.optim.grad_accum_steps == 1
    cfg = load_config(ROOT / "configs/pretrain_vit_b.yaml")
    assert check_batch_sizes(cfg, 64) == 1024 and cfg.optim.grad_accum_steps == 1
    assert cfg.optim.micro_batch_size == 16
    cfg = load_config(ROOT / "configs/pretrain_vit_b.yaml")
    with pytest.raises(ConfigError, match=r"optim.global_batch_size=1024 is not a multiple of micro_batch_size "
                                          r"\(32\) x world size \(48\) = 1536"):
        check_batch_sizes(cfg, 48)
    cfg = load_config(None)  # no global batch: no accumulation
    assert check_batch_sizes(cfg, 3) == 48 and cfg.optim.grad_accum_steps == 1


def test_saved_config_holds_absolute_paths_and_loads_from_elsewhere(tmp_path, monkeypatch):
    """Issue 13.5: `hvpmtl eval` from another directory must find the run's data."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", ["data.skip_list=lists/skip.txt"])
    save_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    d = saved["data"]
    assert d["root"] == str(tmp_path / "demo_data") and d["list_file"] == str(tmp_path / "demo_data/train.txt")
    assert d["skip_list"] == str(tmp_path / "lists/skip.txt") and d["shards"] == ""  # empty stays empty
    assert saved["run"]["output_dir"] == str(tmp_path / "runs/demo")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    again = load_config(tmp_path / "saved.yaml")
    assert again.data.dictionary == str(tmp_path / "demo_data/dictionary.txt")
    assert again.model_dump() == {**cfg.model_dump(), "data": again.data.model_dump(), "run": again.run.model_dump()}
    ft = load_config(ROOT / "configs/finetune_tiny.yaml", ["model.init=bb.safetensors", "data.train_dir=t",
                                                           "data.val_dir=v"], schema=FinetuneConfig)
    save_config(ft, tmp_path / "ft.yaml")
    back = load_config(tmp_path / "ft.yaml", schema=FinetuneConfig)
    assert (back.model.init, back.data.train_dir) == (str(elsewhere / "bb.safetensors"), str(elsewhere / "t"))


def test_pretrain_formats_are_the_ones_the_loaders_serve(tmp_path):
    """Issue 10.9: data.format accepts exactly what builds a pre-training loader (imagefolder has none)."""
    import torch

    from hvpmtl.data.loaders.pretrain import build_pretrain_loader
    from hvpmtl.data.loaders.tensor_source import TensorSource
    from hvpmtl.data.tools.synthetic import make_synthetic

    syn = make_synthetic(tmp_path / "syn", 8, seed=0, shard_size=8)
    sets = {"tencent": [f"data.list_file={syn['list_file']}"], "synthetic": [f"data.list_file={syn['list_file']}"],
            "shards": [f"data.shards={syn['shards']}"], "tensors": []}
    assert set(sets) == set(PRETRAIN_FORMATS)
    for fmt in PRETRAIN_FORMATS:
        cfg = load_config(ROOT / "configs/test_tiny.yaml", [
            f"data.format={fmt}", f"data.root={syn['root']}", "data.num_classes=24", "data.device=cpu",
            "model.img_size=32", "data.img_size=32", "data.mask_patch_size=16", *sets[fmt]])
        kw = dict(batch_size=4, patch_size=16, rank=0, world_size=1)
        if fmt == "tensors":
            loader = TensorSource(cfg.data, **kw)
        else:
            loader = build_pretrain_loader(cfg.data, local_rank=0, seed=0, **kw)
        batch = next(iter(loader))
        assert batch["view1"].shape == (4, 3, 32, 32) and batch["labels"].dtype == torch.float32, fmt


def test_swav_queue_is_a_multiple_of_the_global_batch():
    cfg = load_config(None, ["optim.micro_batch_size=16", "objectives.swav.queue_length=3072"])
    assert check_batch_sizes(cfg, 64) == 1024
    with pytest.raises(ConfigError, match=r"queue_length=3072 must be a multiple of the global batch \(1280\)"):
        check_batch_sizes(cfg, 80)
    check_batch_sizes(load_config(None, ["optim.micro_batch_size=16", "objectives.swav.queue_length=3072",
                                         "objectives.swav.enabled=false"]), 80)  # no SwAV, no queue
