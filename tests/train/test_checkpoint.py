"""hvpmtl.train.checkpoint on real DeepSpeed checkpoints of one in-process engine: the manifest, the resume
decision (which tag, never a damaged or foreign one), pruning by run, --resume none/fresh/<tag>, loading
that fails half-way, per-rank state for another world size, and the default backbone of a run."""
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hvpmtl.config import load_config
from hvpmtl.train import checkpoint as ck
from hvpmtl.train.pretrain import Pretrainer

STEPS = (2, 4, 6)


def rewrite(path: Path, text: str) -> None:
    path.unlink()  # a hard-linked copy: never write through to the original
    path.write_text(text)


def reseal(tag: Path) -> None:
    """Rewrite a manifest for the files as they are now (what someone who 'repairs' a checkpoint does)."""
    m = json.loads((tag / "COMPLETE").read_text())
    for name, e in m["files"].items():
        e["size"] = (tag / name).stat().st_size
        e["sha256"] = ck._digest(tag / name)
    rewrite(tag / "COMPLETE", json.dumps(m))


def damage(path: Path, how: str) -> None:
    """Damage a file of a hard-linked copy without touching the original inode."""
    data = bytearray(path.read_bytes())
    path.unlink()
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip":  # same size, one byte in the middle
        data[len(data) // 2] ^= 0xFF
    elif how == "missing":
        return
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "run"
    cfg = load_config("configs/test_tiny.yaml", [f"run.output_dir={out}", "run.keep_checkpoints=5",
                                                 "tracking.enabled=false"])
    t = Pretrainer(cfg, resume="none")
    t.loader.set_epoch(0)
    for s in STEPS:  # real engine files; no training needed between them
        t.step = s
        t.save()
    yield t
    t.tracker.close()


@pytest.fixture
def copy(trainer, tmp_path):
    """A copy of the run folder (hard links: cheap) to damage."""
    out = tmp_path / "run"
    shutil.copytree(trainer.out_dir, out, copy_function=os.link,
                    ignore=shutil.ignore_patterns(".hvpmtl.lock*", "metrics.jsonl"))
    return out


def _open(out, how="auto"):
    run = ck.open_run(out, how, log=lambda m: None)
    if run.lock is not None:
        run.lock.release()
    return run


def test_manifest_names_run_world_size_and_every_file_with_its_checksum(trainer):
    tag = trainer.ckpt_dir / ck.tag_for(6)
    m = json.loads((tag / "COMPLETE").read_text())
    assert m["run_id"] == trainer.run_state.run_id and m["world_size"] == 1 and m["step"] == 6
    on_disk = {p.name for p in tag.iterdir() if p.name != "COMPLETE"}
    assert set(m["files"]) == on_disk == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                          "rank_0.pt"}
    for name, e in m["files"].items():
        assert e["size"] == (tag / name).stat().st_size
        assert e["sha256"] == ck._digest(tag / name)
    assert m["files"]["mp_rank_00_model_states.pt"]["ranks"] == "all"
    assert m["files"]["rank_0.pt"]["ranks"] == [0]
    # rank files are plain data: the weights-only unpickler reads them with no allow-list at all
    state = torch.load(tag / "rank_0.pt", weights_only=True)
    assert set(state) >= {"rng", "data", "queue"}


def test_auto_takes_the_newest_and_loads_it(trainer, copy):
    run = _open(copy)
    assert run.choice.tag_dir.name == ck.tag_for(6) and run.run_id == trainer.run_state.run_id
    tag_dir, client, rank_state = ck.resume(trainer.engine, run, log=lambda m: None)
    assert client["step"] == 6 and rank_state["data"]["epoch"] == 0


@pytest.mark.parametrize("name", ["rank_0.pt", "mp_rank_00_model_states.pt",
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt", "COMPLETE"])
@pytest.mark.parametrize("how", ["truncate", "flip", "missing"])
def test_any_damaged_file_of_the_newest_falls_back_to_the_previous_tag(copy, name, how):
    damage(copy / "checkpoints" / ck.tag_for(6) / name, how)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run = _open(copy)
    assert run.choice.tag_dir.name == ck.tag_for(4)
    said = " ".join(str(x.message) for x in w)
    assert ck.tag_for(6) in said and (name in said or "manifest" in said), said


def test_no_loadable_checkpoint_stops_instead_of_starting_over(copy):
    for s in STEPS:
        damage(copy / "checkpoints" / ck.tag_for(s) / "rank_0.pt", "flip")
    with pytest.raises(ck.CheckpointError, match=r"none of the 3 checkpoint\(s\).*does not match its checksum") as e:
        _open(copy)
    assert e.value.exit_code == 6 == ck.EXIT_CHECKPOINT
    assert "--resume fresh" in str(e.value)
    assert not (copy / ".hvpmtl.lock").exists()  # a refusal releases the lock


def test_resume_none_refuses_a_used_folder_and_fresh_moves_the_old_run_aside(trainer, copy):
    with pytest.raises(ck.CheckpointError, match="--resume none, but .* holds checkpoints.*--resume fresh"):
        _open(copy, "none")
    run = _open(copy, "fresh")
    assert run.choice is None and run.run_id != trainer.run_state.run_id
    assert not (copy / "checkpoints").exists()
    moved = list((copy / ck.SUPERSEDED_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(trainer.run_state.run_id)
    assert sorted(p.name for p in (moved[0] / "checkpoints").glob("step_*")) == [ck.tag_for(s) for s in STEPS]
    # only debris of a crashed first save: --resume none may start
    (copy / "checkpoints" / ck.tag_for(1)).mkdir(parents=True)
    assert _open(copy, "none").choice is None


def test_checkpoints_of_another_run_are_never_resumed_or_pruned(trainer, copy):
    ckpt = copy / "checkpoints"
    foreign = ckpt / ck.tag_for(9)
    shutil.copytree(ckpt / ck.tag_for(6), foreign, copy_function=os.link)
    m = json.loads((foreign / "COMPLETE").read_text())
    m["run_id"], m["step"] = "someone-else", 9
    rewrite(foreign / "COMPLETE", json.dumps(m))
    said = []
    run = ck.open_run(copy, "auto", log=said.append)
    assert run.choice.tag_dir.name == ck.tag_for(6)  # `latest` names this run's step 6
    assert any("someone-else" in s for s in said)
    removed = ck.prune(ckpt, run.run_id, ckpt / ck.tag_for(6), keep=1)
    assert sorted(p.name for p in removed) == [ck.tag_for(2), ck.tag_for(4)]
    assert foreign.is_dir() and (ckpt / ck.tag_for(6)).is_dir()
    run.lock.release()


def test_pruning_keeps_the_tag_just_written_and_drops_this_runs_passed_over_ones(trainer, copy):
    ckpt = copy / "checkpoints"
    run_id = trainer.run_state.run_id
    (ckpt / ck.tag_for(3)).mkdir()  # debris of a crashed save
    # resumed from 4 (6 was damaged), now writing 5: 6 is from the abandoned future, 2 is beyond keep=2
    removed = ck.prune(ckpt, run_id, ckpt / ck.tag_for(4), keep=2)
    assert sorted(p.name for p in removed) == [ck.tag_for(3), ck.tag_for(6)]
    assert sorted(p.name for p in ckpt.glob("step_*")) == [ck.tag_for(2), ck.tag_for(4)]
    # keep=1 never removes the tag just written
    ck.prune(ckpt, run_id, ckpt / ck.tag_for(4), keep=1)
    assert sorted(p.name for p in ckpt.glob("step_*")) == [ck.tag_for(4)]


def test_explicit_tag_by_name_continues_or_forks_the_run(trainer, copy):
    run = _open(copy, ck.tag_for(6))
    assert run.choice.tag_dir == copy / "checkpoints" / ck.tag_for(6) and run.run_id == trainer.run_state.run_id
    old = _open(copy, ck.tag_for(2))  # a rewind: the later tags are another history
    assert old.choice.tag_dir.name == ck.tag_for(2) and old.run_id != trainer.run_state.run_id
    assert old.parent == f"{trainer.run_state.run_id}/{ck.tag_for(2)}"
    damage(copy / "checkpoints" / ck.tag_for(4) / "rank_0.pt", "flip")
    with pytest.raises(ck.CheckpointError, match=r"--resume step_00000004 .* does not match its checksum"):
        _open(copy, ck.tag_for(4))  # asked for by name: no fallback
    with pytest.raises(ck.CheckpointError, match="neither a folder nor a tag"):
        _open(copy, "step_00000077")


def test_a_load_that_fails_half_way_stops_the_run(trainer, copy):
    """Files intact per the manifest, but DeepSpeed fails after loading the weights: an error, not a warning."""
    tag = copy / "checkpoints" / ck.tag_for(6)
    f = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = ck.safe_load.load_torch(f)
    del sd["optimizer_state_dict"]["base_optimizer_state"]
    f.unlink()
    torch.save(sd, f)
    reseal(tag)
    run = _open(copy)
    assert run.choice.tag_dir == tag
    with pytest.raises(ck.CheckpointError, match=r"loading .*step_00000006 failed \(rank 0: KeyError.*partly loaded"):
        ck.resume(trainer.engine, run, log=lambda m: None)


def test_checkpoints_of_hvpmtl_before_run_ids_are_resumed_into_a_new_run(copy):
    """Manifests of sizes only, rank files with numpy RNG arrays (what earlier versions wrote)."""
    for s in STEPS:
        tag = copy / "checkpoints" / ck.tag_for(s)
        m = json.loads((tag / "COMPLETE").read_text())
        rewrite(tag / "COMPLETE", json.dumps({"step": s, "files": {k: e["size"] for k, e in m["files"].items()}}))
    rank_file = copy / "checkpoints" / ck.tag_for(6) / "rank_0.pt"
    state = torch.load(rank_file, weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()  # a tuple holding an ndarray
    rank_file.unlink()
    torch.save(state, rank_file)
    m = json.loads((rank_file.parent / "COMPLETE").read_text())
    m["files"]["rank_0.pt"] = rank_file.stat().st_size
    rewrite(rank_file.parent / "COMPLETE", json.dumps(m))
    run = _open(copy)
    assert run.choice.tag_dir.name == ck.tag_for(6) and run.run_id
    ck.set_rng_state(run.choice.rank_state["rng"])
    assert ck.prune(copy / "checkpoints", run.run_id, copy / "checkpoints" / ck.tag_for(6), keep=1) == []


def test_a_run_folder_with_glob_characters_in_its_path_resumes(trainer, copy):
    """DeepSpeed globs for its files; a Slurm array's `run[3]` must still load."""
    odd = copy.parent / "run[3]"
    copy.rename(odd)
    run = _open(odd)
    tag_dir, client, _ = ck.resume(trainer.engine, run, log=lambda m: None)
    assert tag_dir == odd / "checkpoints" / ck.tag_for(6) and client["step"] == 6


def test_rank_state_for_another_world_size():
    def state(r):
        torch.manual_seed(r)
        return {"rng": ck.rng_state(), "data": {"position": 7, "rank": r}, "queue": torch.full((2, 3, 4), float(r))}

    two = [state(0), state(1)]
    ones = ck.rank_state_for_world(two, 0, 1)
    assert ones["data"] == two[0]["data"]
    assert ones["queue"].shape == (2, 6, 4) and sorted(ones["queue"][0, :, 0].tolist()) == [0, 0, 0, 1, 1, 1]
    assert ones["queue"][0, :2, 0].tolist() == [0, 1]  # interleaved by recency
    three = [ck.rank_state_for_world(two, r, 3) for r in range(3)]
    rows = torch.cat([s["queue"] for s in three], dim=1)
    assert rows.shape == (2, 6, 4) and sorted(rows[0, :, 0].tolist()) == [0, 0, 0, 1, 1, 1]  # none lost or doubled
    assert three[2]["data"] == two[0]["data"]
    rngs = [s["rng"]["torch"] for s in three]
    assert not torch.equal(rngs[0], rngs[1]) and not torch.equal(rngs[1], rngs[2])
    assert torch.equal(ck.rank_state_for_world(two, 1, 3)["rng"]["torch"], rngs[1])  # deterministic


def test_rng_state_is_plain_data_and_restores_every_stream(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    st = ck.rng_state()
    torch.save(st, tmp_path / "r.pt")
    ref = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == ref


def test_default_backbone_is_the_student_until_the_teacher_has_left_its_random_start():
    cfg = load_config("configs/test_tiny.yaml")
    share, exact = ck.teacher_init_share(cfg, 186)
    assert exact and share == pytest.approx(0.995 ** 186) and 0.39 < share < 0.40  # the demo's 186 steps
    assert ck.default_weights(cfg, 186, True)[0] == "student"
    assert ck.default_weights(cfg, 1000, True)[0] == "teacher"  # 0.995^1000 = 0.7% left
    assert ck.default_weights(cfg, 10**6, False)[0] == "student"
    cos = load_config("configs/test_tiny.yaml", ["objectives.distill.momentum_schedule=cosine",
                                                 "objectives.distill.momentum=0.99", "optim.max_steps=400"])
    from hvpmtl.train.schedules import momentum_schedule
    m = momentum_schedule(cos.objectives.distill, 400)
    expect = float(np.prod([m[t] for t in range(1, 401)], dtype=np.float64))
    share, exact = ck.teacher_init_share(cos, 400)
    assert exact and share == pytest.approx(expect, rel=1e-9) and share > 0.99 ** 400


# ----------------------------------------------------------------------------- files that would run code


class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint or backbone file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, keep_keys=True) -> None:
    """Replace a torch file by one that holds the same data plus a payload."""
    obj = ck.safe_load.load_torch(path) if keep_keys else {}
    obj["innocent"] = Payload(marker)
    path.unlink()
    torch.save(obj, path)


@pytest.mark.parametrize("name", ["rank_0.pt", "mp_rank_00_model_states.pt"])
def test_a_payload_in_a_resealed_checkpoint_is_refused_and_runs_nothing(copy, tmp_path, name):
    marker = tmp_path / "pwned"
    for s in STEPS:  # every tag: nothing to fall back to
        tag = copy / "checkpoints" / ck.tag_for(s)
        _plant(tag / name, marker)
        reseal(tag)  # checksums match: only the unpickler can tell
    with pytest.raises(ck.CheckpointError, match=r"refused to load: it is not a plain weights file"):
        _open(copy)
    assert not marker.exists()


def test_export_of_a_run_with_a_payload_exits_2_and_runs_nothing(copy, tmp_path, capsys):
    from hvpmtl.cli import main as hvpmtl_main

    marker = tmp_path / "pwned"
    tag = copy / "checkpoints" / ck.tag_for(6)
    _plant(tag / "mp_rank_00_model_states.pt", marker)
    reseal(tag)
    assert hvpmtl_main(["export", "--run-dir", str(copy), "--checkpoint", ck.tag_for(6),
                        "--out", str(tmp_path / "bb.safetensors")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "bb.safetensors").exists()


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_backbone_files_with_a_payload_are_refused_by_eval_and_fine_tuning(tmp_path, capsys, suffix):
    import pickle

    from hvpmtl.cli import main as hvpmtl_main
    from hvpmtl.config import ConfigError, FinetuneConfig
    from hvpmtl.eval.export import read_backbone_file  # what launchers/finetune.py hands to fine-tuning
    from hvpmtl.train.tasks.classification import build_model

    marker = tmp_path / "pwned"
    bad = tmp_path / f"x{suffix}"
    obj = {"model": {"blocks.0.norm1.weight": np.ones(3, np.float32)}, "hvpmtl": {"prefix": ""},
           "x": Payload(marker)}
    if suffix == ".pkl":
        bad.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, bad)
    assert hvpmtl_main(["eval", "knn", "--backbone", str(bad), "--backbone-name", "vit_tiny_patch16_224",
                        "--img-size", "32"]) == 2
    assert "refused to load" in capsys.readouterr().err
    cfg = load_config("configs/finetune_tiny.yaml", [f"data.train_dir={tmp_path}", f"data.val_dir={tmp_path}",
                                                     f"model.init={bad}"], schema=FinetuneConfig)
    with pytest.raises(ConfigError, match="model.init: .*refused to load"):
        build_model(cfg, 3, read_backbone_file)
    assert not marker.exists()
    # the same files without the payload are read (numpy arrays in a .pkl, tensors in a .pth)
    del obj["x"]
    if suffix == ".pkl":
        bad.write_bytes(pickle.dumps(obj))
    else:
        obj["model"] = {k: torch.from_numpy(v) for k, v in obj["model"].items()}
        torch.save(obj, bad)
    state, meta = ck.read_backbone_file(bad)
    assert state["blocks.0.norm1.weight"].tolist() == [1.0, 1.0, 1.0]


def test_a_world_size_change_the_converter_cannot_handle_is_refused_with_both_sizes_and_the_command(copy,
                                                                                                   monkeypatch):
    tag = copy / "checkpoints" / ck.tag_for(6)
    for a, b in (("rank_0.pt", "rank_1.pt"), ("zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                               "zero_pp_rank_1_mp_rank_00_optim_states.pt")):
        os.link(tag / a, tag / b)
    m = json.loads((tag / "COMPLETE").read_text())
    m["world_size"] = 2
    m["files"]["rank_1.pt"] = dict(m["files"]["rank_0.pt"], ranks=[1])
    m["files"]["zero_pp_rank_1_mp_rank_00_optim_states.pt"] = dict(
        m["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"], ranks=[1])
    rewrite(tag / "COMPLETE", json.dumps(m))

    def fails(*a, **k):
        raise RuntimeError("cannot merge these partitions")
    monkeypatch.setattr(ck, "universal", fails)
    with pytest.raises(ck.CheckpointError, match=r"written by 2 rank\(s\) and cannot be re-partitioned for 1 "
                                                 r"\(RuntimeError: cannot merge.*Resume on 2 rank\(s\), or convert it "
                                                 r"yourself: python -m deepspeed.checkpoint.ds_to_universal "
                                                 r"--input_folder .*step_00000006"):
        _open(copy)


# ----------------------------------------------------------------------------- non-finite checkpoints (issue 19)


def _nan_in_model_file(tag: Path) -> None:
    """A NaN in the module's weights of a tag, manifest resealed without the weights_finite flag: what a run of
    hvpmtl before the flag wrote when its weights had turned NaN."""
    path = tag / ck.MODEL_FILE
    state = torch.load(path, weights_only=False)
    key = next(k for k, v in state["module"].items() if v.is_floating_point())
    state["module"][key].view(-1)[0] = float("nan")
    path.unlink()  # a hard-linked copy
    torch.save(state, path)
    m = json.loads((tag / "COMPLETE").read_text())
    m.pop("weights_finite")
    rewrite(tag / "COMPLETE", json.dumps(m))
    reseal(tag)


def test_every_manifest_says_its_weights_are_finite(trainer):
    for s in STEPS:
        assert json.loads((trainer.ckpt_dir / ck.tag_for(s) / "COMPLETE").read_text())["weights_finite"] is True


def test_resume_passes_over_a_checkpoint_with_nan_weights_written_before_the_flag(copy):
    tag = copy / "checkpoints" / ck.tag_for(6)
    _nan_in_model_file(tag)
    assert ck.check_contents(tag, ck.read_manifest(tag), [ck.MODEL_FILE]) == ""  # intact as a file
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run = _open(copy)
    assert run.choice.tag_dir.name == ck.tag_for(4)
    said = " ".join(str(x.message) for x in w)
    assert f"{ck.tag_for(6)} could not be loaded (its weights are not finite ({ck.MODEL_FILE}: inf/NaN in module." \
        in said, said


def test_a_manifest_that_says_not_finite_is_passed_over_by_resume_and_candidates(copy):
    tag = copy / "checkpoints" / ck.tag_for(6)
    m = json.loads((tag / "COMPLETE").read_text())
    m["weights_finite"] = False
    rewrite(tag / "COMPLETE", json.dumps(m))
    with pytest.warns(UserWarning, match=r"step_00000006 is not usable \(its weights are not finite"):
        assert [t.name for t in ck.candidates(copy / "checkpoints")] == [ck.tag_for(4), ck.tag_for(2)]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert _open(copy).choice.tag_dir.name == ck.tag_for(4)


def test_rollback_loads_this_runs_newest_good_tag_into_the_running_engine(trainer, copy):
    """What run.on_nonfinite=rollback calls: this run's newest finite tag, never another run's."""
    run = _open(copy)
    tag = copy / "checkpoints" / ck.tag_for(6)
    m = json.loads((tag / "COMPLETE").read_text())
    m["weights_finite"] = False
    rewrite(tag / "COMPLETE", json.dumps(m))
    msgs = []
    tag_dir, client, rank_state = ck.rollback(trainer.engine, run, log=msgs.append)
    assert tag_dir.name == ck.tag_for(4) and client["step"] == 4 and run.choice is None
    assert msgs == [f"rolled back to {tag_dir}"]
    run.run_id = "another-run"
    assert ck.rollback(trainer.engine, run, log=msgs.append) is None
