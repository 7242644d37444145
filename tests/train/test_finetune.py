"""Fine-tuning through launchers/finetune.py and real DeepSpeed (1 rank), plus its pieces: the
schedule, layer-wise LR decay, initialisation from an export, and config errors."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score
from subprocs import free_port, subprocess_env

from hvpmtl.config import ConfigError, FinetuneConfig, load_config
from hvpmtl.data.loaders.multilabel import build_multilabel_loader
from hvpmtl.data.tools.synthetic_scenes import CLASSES
from hvpmtl.eval.export import export_run, read_backbone_file
from hvpmtl.train.finetune import main
from hvpmtl.train.tasks.classification import build_model, param_groups

ROOT = Path(__file__).resolve().parents[2]

TINY = ROOT / "configs/finetune_tiny.yaml"


@pytest.fixture(scope="module")
def exported(pretrain_run, tmp_path_factory):
    return export_run(pretrain_run["dir"], tmp_path_factory.mktemp("exp") / "bb.safetensors")


def test_two_epochs_report_top1_and_write_checkpoints(exported, shapes, tmp_path, launch):
    out = tmp_path / "ft"
    db = f"sqlite:///{tmp_path}/mlflow.db"
    code, log = launch([sys.executable, str(ROOT / "launchers/finetune.py"), "--config", str(TINY),
                     "--set", f"model.init={exported}", "--set", f"data.train_dir={shapes['train']}",
                     "--set", f"data.val_dir={shapes['val']}", "--set", f"run.output_dir={out}",
                     "--set", f"run.ds_config={ROOT / 'ds_configs/zero2.json'}", "--set", f"tracking.tracking_uri={db}"],
                    cwd=tmp_path)
    assert code == 0, log[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val/top1" in m]
    assert [m["epoch"] for m in evals] == [0, 1]
    assert all(0 <= m["val/top1"] <= 100 and m["val/images"] == 12 for m in evals)
    assert [m["step"] for m in evals] == [3, 6]  # 24 images / batch 8 per epoch
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    assert (out / "checkpoints/step_00000006/COMPLETE").is_file()
    client = MlflowClient(db)
    r = client.search_runs([client.get_experiment_by_name("hvpmtl-finetune").experiment_id])[0]
    assert r.data.metrics["val/top1"] == pytest.approx(evals[-1]["val/top1"])
    # the fine-tuned classifier loads into timm with its 3-way head
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=64, global_pool="avg", fc_norm=False)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert json.loads((out / "classes.json").read_text()) == ["circle", "square", "triangle"]


def test_multilabel_on_two_ranks_scores_every_val_image_by_map(exported, syn, tmp_path, launch):
    """2 ranks through the deepspeed launcher, list files: each rank scores half of the 24 val images; the logged
    mAP must be the one over all 24 (gathered), as sklearn computes it from the exported classifier's scores."""
    out = tmp_path / "ftml"
    code, log = launch([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "launchers/finetune.py"),
                        "--config", str(TINY), "--set", f"model.init={exported}",
                        "--set", f"data.train_list={syn['list_file']}", "--set", f"data.val_list={syn['holdout_list']}",
                        "--set", f"data.root={syn['root']}", "--set", f"data.dictionary={syn['dictionary']}",
                        "--set", "optim.micro_batch_size=2", "--set", f"run.output_dir={out}",
                        "--set", f"run.ds_config={ROOT / 'ds_configs/zero2.json'}", "--set", "tracking.enabled=false"],
                       cwd=tmp_path)
    assert code == 0, log[-4000:]
    assert "24 classes (multi-label, mAP)" in log
    evals = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val/mAP" in m]
    assert [m["epoch"] for m in evals] == [0, 1] and [m["step"] for m in evals] == [2, 4]  # 8 images / (2 x 2)
    assert all(m["val/images"] == 24 for m in evals)
    assert evals[-1]["val/best_mAP"] == max(m["val/mAP"] for m in evals)
    assert json.loads((out / "classes.json").read_text()) == [n for n, _ in CLASSES]
    # the reference: the exported 24-way classifier on the same evaluation view, one process, sklearn's AP
    model = timm.create_model("vit_tiny_patch16_224", num_classes=24, img_size=64, global_pool="avg", fc_norm=False)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    ev = build_multilabel_loader(syn["holdout_list"], syn["root"], num_classes=24, batch_size=24, img_size=64,
                                 train=False, device="cpu", num_threads=1)
    batch = next(iter(ev))
    with torch.no_grad():
        scores = model.eval()(batch["image"]).double().numpy()
    y = batch["labels"].numpy() > 0
    aps = [average_precision_score(y[:, c], scores[:, c]) for c in range(24) if y[:, c].any()]
    assert evals[-1]["val/mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-3)


def _cfg(tmp_path, *more):
    return load_config(TINY, [f"data.train_dir={tmp_path}", f"data.val_dir={tmp_path}", *more], schema=FinetuneConfig)


def test_init_from_export_copies_every_backbone_weight(exported, tmp_path):
    cfg = _cfg(tmp_path, f"model.init={exported}")
    model = build_model(cfg, 5)
    state, _ = read_backbone_file(exported)
    own = model.state_dict()
    assert set(own) - set(state) == {"head.weight", "head.bias"}
    for k, v in state.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    # a different architecture is refused, naming the file
    bad = _cfg(tmp_path, f"model.init={exported}", "model.backbone=vit_small_patch16_224")
    with pytest.raises((ConfigError, RuntimeError), match="size mismatch|does not fit"):
        build_model(bad, 5)


def test_layer_decay_scales(tmp_path):
    cfg = _cfg(tmp_path, "model.random_init=true", "optim.layer_decay=0.5")
    model = build_model(cfg, num_classes=3)
    groups = param_groups(model, cfg, lr=1.0)
    by_param = {id(p): g for g in groups for p in g["params"]}
    depth = len(model.blocks)
    head, first, embed = (by_param[id(p)] for p in (model.head.weight, model.blocks[0].attn.qkv.weight,
                                                    model.patch_embed.proj.weight))
    assert head["lr"] == pytest.approx(1.0)
    assert first["lr"] == pytest.approx(0.5 ** depth) and embed["lr"] == pytest.approx(0.5 ** (depth + 1))
    assert by_param[id(model.blocks[0].norm1.weight)]["weight_decay"] == 0  # norms and biases: no decay


@pytest.mark.parametrize("sets,key", [
    (["model.init=x.safetensors", "model.random_init=true"], "model.init"),
    ([], "model.init"),
    (["model.random_init=true", "data.mixup=0.8", "optim.micro_batch_size=7"], "optim.micro_batch_size"),
    (["model.random_init=true", "optim.layer_decay=1.5"], "optim.layer_decay"),
    (["model.random_init=true", "optim.epochs=x"], "optim.epochs"),
    (["model.random_init=true", "data.train_list=t.txt", "data.val_list=v.txt"], "data.train_dir"),  # both kinds
])
def test_config_errors_name_the_key(tmp_path, sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(tmp_path, *sets)


@pytest.mark.parametrize("sets,key", [
    (["data.train_list=t.txt"], "data.val_list"),
    (["data.train_list=t.txt", "data.val_list=v.txt"], "model.num_classes"),  # no class count, no dictionary
    (["data.train_list=t.txt", "data.val_list=v.txt", "model.num_classes=5", "data.mixup=0.8"], "data.mixup"),
])
def test_list_config_errors_name_the_key(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, ["model.random_init=true", *sets], schema=FinetuneConfig)
    assert load_config(TINY, ["model.random_init=true", "data.train_list=t.txt", "data.val_list=v.txt",
                              "data.dictionary=d.txt"], schema=FinetuneConfig).data.train_list == "t.txt"


def test_launcher_exits_2_on_a_config_error(tmp_path, capsys):
    assert main(["--config", str(TINY), "--set", "model.random_init=true"]) == 2
    assert "data.train_dir" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # stepped with no training
@pytest.mark.parametrize("scale_batch,peak", [(0, 3e-4), (4, 3e-4 * 8 / 4)])
def test_optim_lr_is_the_peak_the_optimizer_reaches(shapes, tmp_path, scale_batch, peak):
    """optim.lr is fine-tuning's peak LR, as pre-training's (issue 21): the real fine-tuner's optimizer (DeepSpeed,
    1 rank) warms up from optim.warmup_lr and is at optim.lr when the warm-up ends; with optim.lr_scale_batch N
    the peak is optim.lr x global batch (8) / N."""
    from hvpmtl.train.finetune import Finetuner

    cfg = load_config(TINY, ["model.random_init=true", f"data.train_dir={shapes['train']}",
                             f"data.val_dir={shapes['val']}", f"run.output_dir={tmp_path / 'ft'}",
                             "tracking.enabled=false", "optim.lr=3e-4", f"optim.lr_scale_batch={scale_batch}",
                             "optim.warmup_epochs=1"], schema=FinetuneConfig)
    t = Finetuner(cfg, resume="none")
    assert t.global_batch == 8 and t.lr == pytest.approx(peak)
    warm = t.steps_per_epoch  # one warm-up epoch
    lrs = [max(t.engine.get_lr())]  # the head's group (layer decay scales the others down)
    for _ in range(warm + 1):
        t.engine.lr_scheduler.step()
        lrs.append(max(t.engine.get_lr()))
    assert lrs[0] == pytest.approx(2.5e-7 + (peak - 2.5e-7) / warm) and lrs[0] < peak
    assert lrs[warm - 1] == pytest.approx(peak) and lrs[warm] == pytest.approx(peak)  # warm-up's last step, the top
    assert lrs[warm + 1] < peak  # the cosine after it


def _ft_args(shapes, out, *more):
    return [sys.executable, str(ROOT / "launchers/finetune.py"), "--config", str(TINY), "--set", "model.random_init=true",
            "--set", f"data.train_dir={shapes['train']}", "--set", f"data.val_dir={shapes['val']}",
            "--set", f"run.output_dir={out}", "--set", f"run.ds_config={ROOT / 'ds_configs/zero2.json'}",
            "--set", "tracking.enabled=false", *more]


def test_non_finite_fine_tuning_losses_are_skipped_counted_and_stop_with_exit_4(shapes, tmp_path):
    """The fine-tuner runs on the pre-training's loop (1 rank in this process, real DeepSpeed): a micro-batch
    whose loss is not finite is skipped (no weight moves) and counted, and run.max_nonfinite_in_row of them
    in a row end the run with the documented exit code 4, not a FloatingPointError traceback (exit 1)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from host_syncs import ListLoader

    from hvpmtl.train.finetune import Finetuner
    from hvpmtl.train.exit_codes import EXIT_NONFINITE

    out = tmp_path / "nan"
    cfg = load_config(TINY, ["model.random_init=true", f"data.train_dir={shapes['train']}",
                             f"data.val_dir={shapes['val']}", f"run.output_dir={out}", "run.max_nonfinite_in_row=2",
                             "tracking.enabled=false"], schema=FinetuneConfig)
    t = Finetuner(cfg, resume="none")
    good = next(iter(t.loader))
    bad = {**good, "image": good["image"].clone()}
    bad["image"][0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in t.engine.module.parameters()]
    t.loader = ListLoader([bad] * 3)
    assert t.run() == EXIT_NONFINITE
    assert t.nonfinite_total == 2 and t.step == 0
    assert all(torch.equal(a, p) for a, p in zip(before, t.engine.module.parameters()))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows if "nonfinite_skipped" in r] == [1, 2]


@pytest.mark.slow
def test_the_fine_tuner_draws_the_progress_bar_when_asked(shapes, tmp_path):
    """run.progress_bar (on a terminal): a tqdm bar of the fine-tuning's steps instead of the step lines."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    logs = {}
    for bar in ("true", "false"):
        out = tmp_path / f"bar_{bar}"
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal has a width
        env = subprocess_env(OMP_NUM_THREADS="1")  # not this process's own rendezvous
        p = subprocess.Popen(_ft_args(shapes, out, "--set", f"run.progress_bar={bar}", "--set", "optim.epochs=1"),
                             stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL, cwd=tmp_path, env=env)
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        stdout = p.stdout.read().decode(errors="replace")
        assert p.wait(300) == 0, stdout[-3000:] + b"".join(chunks).decode(errors="replace")[-3000:]
        os.close(leader)
        logs[bar] = (b"".join(chunks).decode(errors="replace"), stdout)
    term, stdout = logs["true"]
    assert "finetune: 100%" in term and "3/3" in term
    assert "step 1/3" not in stdout
    term, stdout = logs["false"]
    assert "finetune:" not in term and "step 1/3" in stdout
