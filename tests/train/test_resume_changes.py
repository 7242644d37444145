"""Issue 23, items 1 and 2: a resume with changed inputs. A config key that can change is applied from the resumed
step (the LR schedule rebuilt at that step, a line naming the change and the new schedule, config.yaml the config
that trains, the same MLflow run told from which step), one that cannot is refused naming it before the model is built;
the documented fixes for a bad image (validate --write-skip-list then data.skip_list, or data.skip_corrupt) resume
the same run with `--resume auto` on 1 and 2 ranks."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from subprocs import free_port, subprocess_env

from hvpmtl.config import ConfigError
from hvpmtl.train import resume_changes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- the diff (no process)

def _cfg(**over) -> dict:
    base = {"model": {"backbone": "vit_tiny_patch16_224", "decoder_dim": 64, "drop_path_rate": 0.0},
            "data": {"seed": 0, "skip_list": "", "list_file": "/d/train.txt"},
            "optim": {"lr": 1e-4, "micro_batch_size": 4, "betas": [0.9, 0.999]}, "run": {"eval_every": 0}}
    for key, value in over.items():
        section, name = key.split("__")
        base[section] = {**base[section], name: value}
    return base


def test_changeable_keys_are_listed_with_old_and_new_values():
    changes = resume_changes.check_changes(_cfg(), _cfg(optim__lr=1e-2, optim__micro_batch_size=2,
                                                        data__skip_list="/d/skip.txt", model__drop_path_rate=0.1,
                                                        run__eval_every=5), "the checkpoint")
    assert {c.key: (c.old, c.new) for c in changes} == {
        "optim.lr": (1e-4, 1e-2), "optim.micro_batch_size": (4, 2), "data.skip_list": ("", "/d/skip.txt"),
        "model.drop_path_rate": (0.0, 0.1), "run.eval_every": (0, 5)}
    assert "optim.lr 0.0001 -> 0.01" in resume_changes.describe(changes)
    assert resume_changes.check_changes(_cfg(), _cfg(), "x") == []


@pytest.mark.parametrize("key,value", [("model__decoder_dim", 32), ("model__backbone", "vit_small_patch16_224"),
                                       ("data__seed", 1), ("data__list_file", "/other/train.txt")])
def test_fixed_keys_are_refused_naming_the_key_and_the_options(key, value):
    with pytest.raises(ConfigError) as e:
        resume_changes.check_changes(_cfg(), _cfg(**{key: value}), "/run/config.yaml")
    msg = str(e.value)
    assert key.replace("__", ".") in msg and "--resume fresh" in msg and "/run/config.yaml" in msg


def test_keys_only_one_side_has_are_not_changes():
    old = _cfg()
    del old["run"]["eval_every"]
    assert resume_changes.check_changes(old, _cfg(run__eval_every=3), "x") == []


# ----------------------------------------------------------------------------- through the launcher

def _run(cmd, timeout=420):
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _pretrain(out, *more, ranks=1):
    args = ["launchers/pretrain.py", "--config", "configs/test_tiny.yaml", "--resume", "auto",
            "--set", f"run.output_dir={out}", "--set", "run.checkpoint_every=2", "--set", "tracking.enabled=false",
            *more]
    if ranks == 1:
        return _run([sys.executable, *args])
    return _run([str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1",
                 "--master_port", str(free_port()), *args])


def _metrics(out) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if "lr" in m}


def _cosine_lr(step: int, peak: float, steps_per_epoch: int, epochs: int = 2, warmup_epochs: float = 0.5,
               min_lr: float = 1e-7) -> float:
    """The LR logged after optimizer step `step` (the scheduler has stepped `step` times), in float64 by hand."""
    warm, total = round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch
    if step < warm:
        return peak * (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, total - warm))
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * p))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """test_tiny (random tensors) for 4 steps at lr 1e-4: checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("changes") / "run"
    code, log = _pretrain(out, "--set", "optim.max_steps=4")
    assert code == 0, log[-3000:]
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".hvpmtl.lock*"))
    return dst


@pytest.mark.slow
def test_a_changed_lr_applies_from_the_resumed_step(four_steps, tmp_path):
    out = _copy(four_steps, tmp_path / "run")
    code, log = _pretrain(out, "--set", "optim.max_steps=6", "--set", "optim.lr=0.01")
    assert code == 0, log[-3000:]
    assert "Traceback" not in log
    line = next(x for x in log.splitlines() if "resumed at step 4 with changes" in x)
    assert "optim.lr 0.0001 -> 0.01" in line and "Applied from step 5" in line
    spe = int(line.split("steps/epoch ")[1].split(",")[0])
    m = _metrics(out)
    assert sorted(m) == [1, 2, 3, 4, 5, 6]
    for step in (1, 2, 3, 4):  # the first run: the reference's indexing holds
        assert m[step]["lr"] == pytest.approx(_cosine_lr(step, 1e-4, spe), rel=1e-6)
    for step in (5, 6):  # the new peak from the resumed step on, not DeepSpeed's restored schedule
        assert m[step]["lr"] == pytest.approx(_cosine_lr(step, 1e-2, spe), rel=1e-6)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.01  # what trains now
    # the checkpoint written at step 6 carries the config it was trained with
    import torch
    state = torch.load(out / "checkpoints/step_00000006/rank_0.pt", weights_only=True)
    assert state["config"]["optim"]["lr"] == 0.01


@pytest.mark.slow
def test_a_changed_lr_is_recorded_in_the_same_mlflow_run(tmp_path):
    """MLflow cannot change a logged parameter: the run keeps `optim.lr` as it started, gets the parameter
    `resumed_at_step_<N>/optim.lr` with the new value, the tag `config.optim.lr` (the value training uses now),
    the tag `hvpmtl.config_changes.step_<N>` (the change as printed) and config.yaml of step N as an artifact.
    Read back from the sqlite store with MLflow's own client: one run, continued, not a second one."""
    from mlflow import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run"
    track = ["--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri={uri}"]
    code, log = _pretrain(out, *track, "--set", "optim.max_steps=2")
    assert code == 0, log[-3000:]
    code, log = _pretrain(out, *track, "--set", "optim.max_steps=3", "--set", "optim.lr=0.01")
    assert code == 0, log[-3000:]
    assert "Traceback" not in log
    printed = next(x for x in log.splitlines() if "resumed at step 2 with changes: " in x)
    assert "optim.lr 0.0001 -> 0.01" in printed  # (and optim.max_steps 2 -> 3, the longer run)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("hvpmtl").experiment_id])
    assert len(runs) == 1  # the resumed process continued the run
    run = client.get_run(runs[0].info.run_id)
    assert run.data.params["optim.lr"] == "0.0001"  # what it started with: MLflow keeps parameters
    assert run.data.params["resumed_at_step_2/optim.lr"] == "0.01"
    assert run.data.tags["config.optim.lr"] == "0.01"
    assert run.data.params["resumed_at_step_2/optim.max_steps"] == "3"
    recorded = run.data.tags["hvpmtl.config_changes.step_2"]
    assert "optim.lr 0.0001 -> 0.01" in recorded and recorded in printed  # the changes as the trainer printed them
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr")) == [1, 2, 3]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "config/step_2")]
    assert artifacts == ["config/step_2/config.yaml"]
    saved = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config/step_2/config.yaml",
                                                          str(tmp_path))).read_text())
    assert saved["optim"]["lr"] == 0.01


@pytest.mark.slow
def test_a_changed_micro_batch_says_the_new_schedule(four_steps, tmp_path):
    out = _copy(four_steps, tmp_path / "run")
    code, log = _pretrain(out, "--set", "optim.max_steps=5", "--set", "optim.micro_batch_size=2")
    assert code == 0, log[-3000:]
    line = next(x for x in log.splitlines() if "resumed at step 4 with changes" in x)
    assert "optim.micro_batch_size 4 -> 2" in line
    before, after = line.split("steps/epoch ")[1].split(",")[0].split(" -> ")
    assert int(after) == 2 * int(before) and "global batch 4 -> 2" in line
    assert sorted(_metrics(out)) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_fixed_key_is_refused_before_the_model_is_built(four_steps, tmp_path):
    out = _copy(four_steps, tmp_path / "run")
    before = (out / "config.yaml").read_text()
    code, log = _pretrain(out, "--set", "optim.max_steps=6", "--set", "model.decoder_dim=32",
                          "--set", "model.decoder_heads=2")
    assert code == 2, log[-3000:]
    assert "hvpmtl: config error: --resume:" in log and "model.decoder_dim 64 -> 32" in log
    assert "--resume fresh" in log and "Traceback" not in log
    assert "perf: peak" not in log  # the loop never started
    assert (out / "config.yaml").read_text() == before and sorted(_metrics(out)) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- the documented fix for a bad image

def _bad_image_data(tmp_path, n=32, batch_at=6, micro=4):
    """A list of n images where the first sample of global batch `batch_at` of epoch 0 is a truncated JPEG."""
    from hvpmtl.data.loaders.order import epoch_batches
    from hvpmtl.data.tools.synthetic import make_synthetic
    syn = make_synthetic(tmp_path / "data", n, seed=0)
    lines = Path(syn["list_file"]).read_text().splitlines()
    victim = int(epoch_batches(n, micro, 1, 0, 0, 0)[batch_at][0])
    path = Path(syn["root"]) / lines[victim].split("\t")[0]
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return syn, victim + 1


def _data_args(syn):
    return ["--set", "data.format=tencent", "--set", f"data.root={syn['root']}",
            "--set", f"data.list_file={syn['list_file']}", "--set", "data.num_classes=24", "--set", "data.device=cpu",
            "--set", "optim.max_steps=8"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_stop_on_a_bad_image_fix_as_told_and_resume_the_same_run(tmp_path, ranks):
    micro = 4 // ranks  # the same global batch of 4: the same samples at the same steps
    syn, line = _bad_image_data(tmp_path)
    out = tmp_path / "run"
    code, log = _pretrain(out, *_data_args(syn), "--set", f"optim.micro_batch_size={micro}", ranks=ranks)
    assert code == 2, log[-3000:]
    assert f"train.txt:{line}" in log and "data.skip_list" in log and "Traceback" not in log
    last = int((out / "checkpoints/latest").read_text().strip().split("_")[1])  # DALI reads ahead: 2 or 4
    assert last >= 2
    # the fix the message names: the validator's skip list, then data.skip_list
    skip = tmp_path / "skip.txt"
    p = subprocess.run([sys.executable, "-m", "hvpmtl", "data", "validate", "--list", syn["list_file"], "--root",
                        syn["root"], "--write-skip-list", str(skip)], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert f"\t{line}\t" in skip.read_text(), p.stdout + p.stderr
    code, log = _pretrain(out, *_data_args(syn), "--set", f"optim.micro_batch_size={micro}",
                          "--set", f"data.skip_list={skip}", ranks=ranks)
    assert code == 0, log[-3000:]
    assert "Traceback" not in log
    assert "32 -> 31 samples (1 left out, 0 added)" in log
    assert "data.skip_list '' -> " in log  # the change is named
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "lr" in json.loads(x)]
    assert steps[-(8 - last):] == list(range(last + 1, 9))  # the same run went on from its last checkpoint
    assert f"resumed at step {last} with changes: data.skip_list" in log


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_stop_on_a_bad_image_then_skip_corrupt_resumes_the_same_run(tmp_path, ranks):
    """The other fix the message names: `--set data.skip_corrupt=true` (no validate run) and `--resume auto`. The
    same run goes on from its last checkpoint (same run id, steps continue), the truncated sample is left out when
    read, named by file:line and counted."""
    from hvpmtl.checkpoint import read_manifest
    micro = 4 // ranks
    syn, line = _bad_image_data(tmp_path)
    out = tmp_path / "run"
    code, log = _pretrain(out, *_data_args(syn), "--set", f"optim.micro_batch_size={micro}", ranks=ranks)
    assert code == 2, log[-3000:]
    assert f"train.txt:{line}" in log and "data.skip_corrupt: true" in log and "Traceback" not in log
    latest = (out / "checkpoints/latest").read_text().strip()
    last = int(latest.split("_")[1])
    assert last >= 2
    run_id = read_manifest(out / "checkpoints" / latest)["run_id"]
    code, log = _pretrain(out, *_data_args(syn), "--set", f"optim.micro_batch_size={micro}",
                          "--set", "data.skip_corrupt=true", ranks=ranks)
    assert code == 0, log[-3000:]
    assert "Traceback" not in log
    assert f"resumed at step {last} with changes: data.skip_corrupt False -> True" in log
    # left out when read (no validator verdict: the population is unchanged), named and counted
    assert f"train.txt:{line} (" in log and "left out (data.skip_corrupt), 1 so far" in log
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "lr" in r]
    assert steps[:last] == list(range(1, last + 1))  # the first process's steps
    assert steps[-(8 - last):] == list(range(last + 1, 9))  # then the same run from its checkpoint, not from 0
    final = [r for r in rows if "lr" in r][-1]
    # the victim is in rank 0's share of its global batch (epoch_batches: [batch, rank, micro]), whose count is logged
    assert final["data/failed_reads"] == 1 and final["data/left_out"] == 1
    assert read_manifest(out / "checkpoints/step_00000008")["run_id"] == run_id  # the same run, not a new one
