"""A 2-rank run's newest checkpoint damaged in any one file, on either rank: every rank resumes from the same
older tag, and training continues with the uninterrupted losses. And the world size changes between runs
(2 ranks -> 1, 1 -> 2): DeepSpeed's universal checkpoint re-partitions the ZeRO-2 state.

Compact design: the session's reference run (8 steps, checkpoints at 4, 6, 8) is the writer. Copies of its
folder as after a kill at step 6 (hard links; a damaged file is rewritten, never the original) are judged by
one 2-rank launch that runs only the resume decision on all ten (file x damage) copies, then two copies are
resumed for real and trained to step 8.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch

from . import tiny_run
from .launch_env import REPO, VENV_BIN, launch_env
from .procs import free_port, log_tail, run_logged

pytestmark = pytest.mark.cluster

FILES = ("rank_0.pt", "rank_1.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "zero_pp_rank_1_mp_rank_00_optim_states.pt")
DAMAGE = ("truncate", "same-size")


def _tag(step: int) -> str:
    return f"step_{step:08d}"


@pytest.fixture(scope="module")
def reference_run(cluster_dir, reference_metrics):
    out = cluster_dir / "reference" / "run"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [_tag(4), _tag(6), _tag(8)]
    return out


def _killed_after(reference_run, dst, step):
    """The reference run's folder as it was when killed after `step` (later tags and metrics removed)."""
    shutil.copytree(reference_run, dst, copy_function=os.link)
    for t in (dst / "checkpoints").glob("step_*"):
        if int(t.name[len("step_"):]) > step:
            shutil.rmtree(t)
    for f in (dst / "checkpoints" / "latest", dst / "metrics.jsonl"):
        text = f.read_text()
        f.unlink()  # hard link: never write through to the reference
        f.write_text(_tag(step) if f.name == "latest" else "\n".join(text.splitlines()[:step]) + "\n")
    return dst


def _damage(path, how):
    data = bytearray(path.read_bytes())
    path.unlink()
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_any_damaged_file_on_either_rank_makes_both_ranks_agree_on_the_older_tag(run_dir, reference_run):
    folders = {}
    for name in FILES:
        for how in DAMAGE:
            d = _killed_after(reference_run, run_dir / f"{name}-{how}", 6)
            _damage(d / "checkpoints" / _tag(6) / name, how)
            folders[(name, how)] = d
    intact = _killed_after(reference_run, run_dir / "intact", 6)
    log = run_dir / "decide.log"
    result = run_dir / "decision"
    cmd = [f"{VENV_BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests/cluster/resume_decision.py"), "--result", str(result),
           *map(str, folders.values()), str(intact)]
    rc = run_logged(cmd, log, timeout=600, env=launch_env(), cwd=run_dir)
    assert rc == 0, log_tail(log, 60)
    ranks = [json.loads((run_dir / f"decision.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert all(r["folders"][str(intact)]["tag"] == _tag(6) for r in ranks)
    expected_rng = [hashlib.sha256(torch.load(intact / "checkpoints" / _tag(4) / f"rank_{r}.pt", weights_only=True)
                                   ["rng"]["torch"].numpy().tobytes()).hexdigest() for r in (0, 1)]
    assert expected_rng[0] != expected_rng[1]
    wrong = []
    for (name, how), d in folders.items():
        got = [r["folders"][str(d)] for r in ranks]
        tags = [g.get("tag") for g in got]
        if tags != [_tag(4), _tag(4)] or got[0]["run_id"] != got[1]["run_id"]:
            wrong.append(f"{name} {how}: ranks chose {tags} ({got})")
            continue
        said = " ".join(got[0]["warnings"])
        if not (_tag(6) in said and name in said):
            wrong.append(f"{name} {how}: rank 0 did not say why {_tag(6)} was passed over: {said}")
        if [g["rng"] for g in got] != expected_rng:
            wrong.append(f"{name} {how}: a rank got another rank's state")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name,how", [("rank_1.pt", "same-size"),
                                      ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "truncate")])
def test_resume_past_a_damaged_file_continues_with_the_uninterrupted_losses(run_dir, reference_run,
                                                                            reference_metrics, name, how):
    out = _killed_after(reference_run, run_dir / "run", 6)  # `[...]` in the path: DeepSpeed's glob must cope
    _damage(out / "checkpoints" / _tag(6) / name, how)
    lines = tiny_run.metrics_lines(out)
    log = run_dir / "launcher.log"
    rc = run_logged(tiny_run.deepspeed_local_cmd(*tiny_run.pretrain_args(out), "--resume", "auto"), log,
                    timeout=600, env=launch_env(), cwd=run_dir)
    assert rc == 0, log_tail(log, 60)
    text = log.read_text()
    assert f"resumed from {out / 'checkpoints' / _tag(4)}" in text and name in text, log_tail(log, 60)
    resumed = tiny_run.read_metrics(out, skip_lines=lines)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    tiny_run.assert_same_losses(resumed, reference_metrics, range(5, 9), f"resumed past a {how} {name}")
    run_id = json.loads((out / "checkpoints" / _tag(8) / "COMPLETE").read_text())["run_id"]
    assert run_id == json.loads((out / "checkpoints" / _tag(4) / "COMPLETE").read_text())["run_id"]


# The 1-rank runs keep the global batch (micro 4 x 1 rank = micro 2 x 2 ranks). A 1-rank run equals the 2-rank run
# with that global batch up to float summation order (tests/train/test_engine_launch.py: 1e-5), so "continuing as a
# run of the new world size would" is checked against the uninterrupted 2-rank reference at that tolerance.
WORLD_TOL = 1e-5


def _one_rank_cmd(out, steps):
    return [sys.executable, str(tiny_run.ENTRY), *tiny_run.pretrain_args(out, steps=steps),
            "--set", "optim.micro_batch_size=4"]


def test_two_ranks_to_one_resumes_through_a_universal_checkpoint(run_dir, reference_run, reference_metrics):
    out = _killed_after(reference_run, run_dir / "run[2-1]", 4)  # [ ] in the path: conversion and load cope
    log = run_dir / "launcher.log"
    rc = run_logged(_one_rank_cmd(out, tiny_run.STEPS), log, timeout=600, env=launch_env(), cwd=run_dir)
    assert rc == 0, log_tail(log, 60)
    text = log.read_text()
    assert f"resumed from {out / 'checkpoints' / _tag(4)} (2 -> 1 ranks)" in text, log_tail(log, 60)
    assert "1 rank(s)" in text and "global batch 4" in text
    resumed = tiny_run.read_metrics(out, skip_lines=4)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    tiny_run.assert_same_losses(resumed, reference_metrics, range(5, 9), "2 ranks -> 1", tol=WORLD_TOL)
    m = json.loads((out / "checkpoints" / _tag(8) / "COMPLETE").read_text())
    assert m["world_size"] == 1 and set(m["files"]) == {"rank_0.pt", "mp_rank_00_model_states.pt",
                                                         "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert not (out / "checkpoints" / ".universal").exists()


def test_one_rank_to_two_resumes_through_a_universal_checkpoint(run_dir, reference_metrics):
    out = run_dir / "run"
    log = run_dir / "launcher.log"
    rc = run_logged(_one_rank_cmd(out, 4), log, timeout=600, env=launch_env(), cwd=run_dir)
    assert rc == 0, log_tail(log, 60)
    tiny_run.assert_same_losses(tiny_run.read_metrics(out), reference_metrics, range(1, 5), "1 rank",
                                tol=WORLD_TOL)
    rc = run_logged(tiny_run.deepspeed_local_cmd(*tiny_run.pretrain_args(out)), log, timeout=600, env=launch_env(),
                    cwd=run_dir)
    assert rc == 0, log_tail(log, 60)
    assert f"resumed from {out / 'checkpoints' / _tag(4)} (1 -> 2 ranks)" in log.read_text(), log_tail(log, 60)
    resumed = tiny_run.read_metrics(out, skip_lines=4)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    tiny_run.assert_same_losses(resumed, reference_metrics, range(5, 9), "1 rank -> 2", tol=WORLD_TOL)
    assert json.loads((out / "checkpoints" / _tag(8) / "COMPLETE").read_text())["world_size"] == 2
