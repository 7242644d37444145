"""hvpmtl.checkpoint.run on real DeepSpeed checkpoints of one in-process engine: the resume decision (which tag,
never a damaged or foreign one), --resume none/fresh/<tag>, loading that fails half-way, rollback."""
import json
import os
import shutil
import warnings

import pytest
import torch

from hvpmtl import checkpoint as ck
from tests.checkpoint.tagged_run import STEPS, damage, open_quietly, reseal, rewrite


def test_auto_takes_the_newest_and_loads_it(trainer, copy):
    run = open_quietly(copy)
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
        run = open_quietly(copy)
    assert run.choice.tag_dir.name == ck.tag_for(4)
    said = " ".join(str(x.message) for x in w)
    assert ck.tag_for(6) in said and (name in said or "manifest" in said), said


def test_no_loadable_checkpoint_stops_instead_of_starting_over(copy):
    for s in STEPS:
        damage(copy / "checkpoints" / ck.tag_for(s) / "rank_0.pt", "flip")
    with pytest.raises(ck.CheckpointError, match=r"none of the 3 checkpoint\(s\).*does not match its checksum") as e:
        open_quietly(copy)
    assert e.value.exit_code == 6 == ck.EXIT_CHECKPOINT
    assert "--resume fresh" in str(e.value)
    assert not (copy / ".hvpmtl.lock").exists()  # a refusal releases the lock


def test_resume_none_refuses_a_used_folder_and_fresh_moves_the_old_run_aside(trainer, copy):
    with pytest.raises(ck.CheckpointError, match="--resume none, but .* holds checkpoints.*--resume fresh"):
        open_quietly(copy, "none")
    run = open_quietly(copy, "fresh")
    assert run.choice is None and run.run_id != trainer.run_state.run_id
    assert not (copy / "checkpoints").exists()
    moved = list((copy / ck.SUPERSEDED_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(trainer.run_state.run_id)
    assert sorted(p.name for p in (moved[0] / "checkpoints").glob("step_*")) == [ck.tag_for(s) for s in STEPS]
    # only debris of a crashed first save: --resume none may start
    (copy / "checkpoints" / ck.tag_for(1)).mkdir(parents=True)
    assert open_quietly(copy, "none").choice is None


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


def test_explicit_tag_by_name_continues_or_forks_the_run(trainer, copy):
    run = open_quietly(copy, ck.tag_for(6))
    assert run.choice.tag_dir == copy / "checkpoints" / ck.tag_for(6) and run.run_id == trainer.run_state.run_id
    old = open_quietly(copy, ck.tag_for(2))  # a rewind: the later tags are another history
    assert old.choice.tag_dir.name == ck.tag_for(2) and old.run_id != trainer.run_state.run_id
    assert old.parent == f"{trainer.run_state.run_id}/{ck.tag_for(2)}"
    damage(copy / "checkpoints" / ck.tag_for(4) / "rank_0.pt", "flip")
    with pytest.raises(ck.CheckpointError, match=r"--resume step_00000004 .* does not match its checksum"):
        open_quietly(copy, ck.tag_for(4))  # asked for by name: no fallback
    with pytest.raises(ck.CheckpointError, match="neither a folder nor a tag"):
        open_quietly(copy, "step_00000077")


def test_a_manifest_whose_files_is_a_list_is_passed_over_naming_why(copy):
    tag = copy / "checkpoints" / ck.tag_for(6)
    m = json.loads((tag / "COMPLETE").read_text())
    m["files"] = list(m["files"])
    rewrite(tag / "COMPLETE", json.dumps(m))
    with pytest.warns(UserWarning, match=r"step_00000006 is not usable \(unreadable manifest: 'files' is not a mapping"):
        run = open_quietly(copy)
    assert run.choice.tag_dir.name == ck.tag_for(4)


def test_a_forked_run_stays_a_fork_in_every_later_manifest(copy):
    tag = copy / "checkpoints" / ck.tag_for(6)
    m = json.loads((tag / "COMPLETE").read_text())
    m["parent"] = "20261206-000000-0badf00d/step_00000002"  # what the fork's first save wrote
    rewrite(tag / "COMPLETE", json.dumps(m))
    run = open_quietly(copy)  # --resume auto: the same (forked) run goes on, and its next saves say so too
    assert run.run_id == m["run_id"] and run.parent == m["parent"]


def test_a_load_that_fails_half_way_stops_the_run(trainer, copy):
    """Files intact per the manifest, but DeepSpeed fails after loading the weights: an error, not a warning."""
    tag = copy / "checkpoints" / ck.tag_for(6)
    f = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = ck.safe_load.load_torch(f)
    del sd["optimizer_state_dict"]["base_optimizer_state"]
    f.unlink()
    torch.save(sd, f)
    reseal(tag)
    run = open_quietly(copy)
    assert run.choice.tag_dir == tag
    with pytest.raises(ck.CheckpointError, match=r"loading .*step_00000006 failed \(rank 0: KeyError.*partly loaded"):
        ck.resume(trainer.engine, run, log=lambda m: None)


def test_a_manifest_of_an_unsupported_format_is_passed_over_refused_by_name_and_never_pruned(trainer, copy):
    """A manifest without format 2 and a run id (sizes only) is unreadable: passed over like a damaged one,
    refused when asked for by name, and never pruned (unlike the manifest-less debris of a crashed save)."""
    ckpt = copy / "checkpoints"
    tag = ckpt / ck.tag_for(6)
    m = json.loads((tag / "COMPLETE").read_text())
    rewrite(tag / "COMPLETE", json.dumps({"step": 6, "files": {k: e["size"] for k, e in m["files"].items()}}))
    unsupported = r"unreadable manifest: format \(none\) without a run id: written by an unsupported checkpoint format"
    with pytest.raises(ValueError, match=unsupported):
        ck.read_manifest(tag)
    with pytest.warns(UserWarning, match=r"step_00000006 is not usable \(" + unsupported):
        run = open_quietly(copy)
    assert run.choice.tag_dir.name == ck.tag_for(4) and run.run_id == trainer.run_state.run_id
    with pytest.raises(ck.CheckpointError, match=r"--resume step_00000006: not a usable checkpoint \(" + unsupported):
        open_quietly(copy, ck.tag_for(6))
    m["format"] = 1  # a format number below 2, run id present: unreadable too
    rewrite(tag / "COMPLETE", json.dumps(m))
    with pytest.raises(ValueError, match=r"unreadable manifest: format 1: written by an unsupported checkpoint format"):
        ck.read_manifest(tag)
    (ckpt / ck.tag_for(7)).mkdir()  # debris of a crashed save
    removed = ck.prune(ckpt, run.run_id, ckpt / ck.tag_for(8), keep=1)  # this run just wrote step 8
    assert sorted(p.name for p in removed) == [ck.tag_for(2), ck.tag_for(4), ck.tag_for(7)]
    assert tag.is_dir() and (tag / ck.MODEL_FILE).is_file()


def test_a_run_folder_with_glob_characters_in_its_path_resumes(trainer, copy):
    """DeepSpeed globs for its files; a Slurm array's `run[3]` must still load."""
    odd = copy.parent / "run[3]"
    copy.rename(odd)
    run = open_quietly(odd)
    tag_dir, client, _ = ck.resume(trainer.engine, run, log=lambda m: None)
    assert tag_dir == odd / "checkpoints" / ck.tag_for(6) and client["step"] == 6


def test_rollback_loads_this_runs_newest_good_tag_into_the_running_engine(trainer, copy):
    """What run.on_nonfinite=rollback calls: this run's newest finite tag, never another run's."""
    run = open_quietly(copy)
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
