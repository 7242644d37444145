"""Issue 19, items 1-2, through the real DeepSpeed ZeRO-2 engine on the CPU: an optimizer step DeepSpeed skips
(inf gradient, bf16) is counted, warned about and handled; step counter, LR schedule and EMA teacher count only
applied steps; a non-finite state is never saved; run.on_nonfinite=rollback reloads the last good checkpoint and
the data moves on (1 rank in-process; 2 ranks through the deepspeed launcher, slow)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvpmtl import checkpoint
from hvpmtl.checkpoint import safe_load
from hvpmtl.config import load_config
from hvpmtl.train.exit_codes import EXIT_NONFINITE, EXIT_OK
from hvpmtl.train.pretrain import Pretrainer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from host_syncs import ListLoader  # noqa: E402  (a loader over fixed batches, with the engine's loader interface)

pytestmark = pytest.mark.slow  # each test trains DeepSpeed engines (in this process or on 2 ranks)

INF = float("inf")
PATCH = "backbone.model.patch_embed.proj.weight"  # used by every forward of every view


def _trainer(out, *more):
    cfg = load_config(ROOT / "configs/test_tiny.yaml",
                      [f"run.output_dir={out}", "run.checkpoint_every=1000", "optim.max_steps=100",
                       f"run.ds_config={ROOT / 'ds_configs/zero2.json'}", *more])
    t = Pretrainer(cfg, resume="none")
    t.loader.set_epoch(0)
    return t


def _batches(t, n):
    return [b for _, b in zip(range(n), t.loader)]


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


class GradFault:
    """Multiplies one parameter's gradient by inf at the chosen backward passes (1-based)."""

    def __init__(self, param, at):
        self.at, self.calls = set(at), 0
        param.register_hook(self)

    def __call__(self, grad):
        self.calls += 1
        return grad * INF if self.calls in self.at else grad


def _corrupt(t):
    """NaN in the state as a diverged run has it: a weight of the module, ZeRO's fp32 master partition, the
    EMA teacher."""
    with torch.no_grad():
        dict(t.engine.module.named_parameters())[PATCH].view(-1)[0] = math.nan
        t.engine.optimizer.single_partition_of_fp32_groups[0][0] = math.nan
        dict(t.meta.teacher.named_parameters())[PATCH].view(-1)[0] = math.nan


def test_a_skipped_optimizer_step_is_counted_warned_and_moves_nothing(tmp_path, capsys):
    """bf16, an inf in one gradient at the 2nd backward: DeepSpeed skips that step; hvpmtl warns naming the step and
    the gradient norm, counts train/skipped_steps (metrics.jsonl and MLflow), and neither the step counter nor the
    LR schedule nor the teacher moves. Then skipped steps in a row meet run.max_nonfinite_in_row (stop: exit 4,
    the last good state saved)."""
    db = tmp_path / "mlflow.db"
    t = _trainer(tmp_path / "run", "run.precision=bf16", f"tracking.tracking_uri=sqlite:///{db}",
                 "run.max_nonfinite_in_row=2", "run.on_nonfinite=stop")
    assert t.ds_config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert t.engine.optimizer.check_grad_overflow  # what makes ZeRO-2 skip in bf16
    batches = _batches(t, 5)
    fault = GradFault(dict(t.engine.module.named_parameters())[PATCH], at={2})
    after_step, teacher_updates = [], []

    class Snap:
        def after_step(self, trainer, batch):
            after_step.append(_params(trainer.engine.module))

    t.hooks.append(Snap())
    at_skip = []
    skipped = t._skipped_step
    t._skipped_step = lambda: (at_skip.append((_params(t.engine.module), _params(t.meta.teacher))), skipped())[1]
    update = t.meta.teacher.update
    t.meta.teacher.update = lambda student, m: (teacher_updates.append(m), update(student, m))

    t.loader = ListLoader(batches[:3])
    assert t.train_one_epoch() is None
    assert fault.calls == 3 and t.skipped_steps == 1
    assert t.step == 2  # applied steps only
    assert t.engine.lr_scheduler.last_epoch == t.step  # DeepSpeed did not step the schedule on the skip ...
    assert t.engine.global_steps == 3  # ... though it counts the boundary
    assert len(teacher_updates) == 2 and teacher_updates == [t.momentum[1], t.momentum[2]]
    weights, teacher = at_skip[0]
    assert _equal(weights, after_step[0])  # the skipped step changed no weight
    assert not _equal(after_step[0], after_step[1])  # the next one did
    out = capsys.readouterr().out
    assert "[hvpmtl] step 2: DeepSpeed skipped the optimizer step (gradient norm inf)" in out
    rows = _rows(t.out_dir)
    assert any(r.get("train/skipped_steps") == 1 and r["step"] == 1 and "loss" not in r for r in rows)
    assert [r["train/skipped_steps"] for r in rows if "loss" in r] == [0, 1]

    # skipped steps in a row are non-finite events: 2 in a row -> stop, state before them saved
    fault.at = {4, 5}
    t.loader = ListLoader(batches[3:])
    assert t.train_one_epoch() == EXIT_NONFINITE
    assert t.skipped_steps == 3 and t.step == 2
    assert (t.ckpt_dir / "latest").read_text() == checkpoint.tag_for(2)
    assert "stopping: 2 skipped optimizer steps in a row" in capsys.readouterr().out
    t.tracker.close()

    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    history = client.get_metric_history(t.tracker.run_id, "train/skipped_steps")
    assert max(m.value for m in history) == 3


def test_a_nonfinite_state_is_never_saved_and_resume_passes_over_it(tmp_path, capsys):
    t = _trainer(tmp_path / "run", "tracking.enabled=false", "run.max_nonfinite_in_row=2", "run.on_nonfinite=stop")
    batches = _batches(t, 3)
    t.loader = ListLoader(batches[:1])
    t.train_one_epoch()
    assert t.save() is not None and t.step == 1
    m = json.loads((t.ckpt_dir / checkpoint.tag_for(1) / "COMPLETE").read_text())
    assert m["weights_finite"] is True

    t.step = 7  # any later step: nothing may be written for it
    _corrupt(t)
    assert t.save() is None
    assert not (t.ckpt_dir / checkpoint.tag_for(7)).exists()
    assert (t.ckpt_dir / "latest").read_text() == checkpoint.tag_for(1)
    for part in ("weights (1 rank(s))", "fp32 master weights (1 rank(s))", "teacher (1 rank(s))"):
        assert part in t.unsaved
    assert "optimizer state" not in t.unsaved  # the Adam moments are still finite

    # the loop with corrupted weights: every loss non-finite -> stop; "saving the last good state" writes nothing
    t.step = 1
    t.loader = ListLoader(batches[1:])
    assert t.train_one_epoch() == EXIT_NONFINITE
    out = capsys.readouterr().out
    assert "not saving step 1: inf/NaN in weights" in out and "the last good checkpoint stays step_00000001" in out
    assert [p.name for p in checkpoint.tag_dirs(t.ckpt_dir)] == [checkpoint.tag_for(1)]

    # a requeue resumes the good state
    t.run_state.lock.release()  # the stopped job has let go of the folder
    run = checkpoint.open_run(t.out_dir, "auto")
    run.lock.release()
    tag, client, _ = checkpoint.resume(t.engine, run, log=lambda m: None)
    assert tag.name == checkpoint.tag_for(1) and client["step"] == 1
    assert checkpoint.nonfinite_state(t.engine) == ""
    t.tracker.close()


def test_rollback_reloads_the_last_good_state_and_the_data_moves_on(tmp_path, capsys):
    t = _trainer(tmp_path / "run", "tracking.enabled=false", "run.max_nonfinite_in_row=2", "run.checkpoint_every=2",
                 "run.on_nonfinite=rollback", "run.max_rollbacks=1", "run.rollback_skip_batches=1",
                 "run.rollback_lr_scale=0.5", "run.rollback_lr_steps=1")
    batches = _batches(t, 10)
    t.loader = ListLoader(batches[:3])
    assert t.train_one_epoch() is None and t.step == 3  # checkpoint at step 2
    saved = checkpoint.read_weights(t.ckpt_dir / checkpoint.tag_for(2))[0]
    good_weights = [saved[n] for n, _ in t.engine.module.named_parameters()]
    good_teacher = checkpoint.read_weights(t.ckpt_dir / checkpoint.tag_for(2), "teacher")[0]

    _corrupt(t)  # a spike after step 3: every loss is non-finite from here
    seen = []
    t.loader = ListLoader(batches[3:6])
    orig = t.train_micro_batch
    t.train_micro_batch = lambda b: (seen.append(b), orig(b))[1]
    assert t.train_one_epoch() is None
    # 2 non-finite losses, then back to step 2; the 3rd batch is the one skipped beyond the window
    assert t.step == 2 and len(seen) == 2 and t.loader.position == 3
    assert t.rollbacks == [{"from_step": 3, "to_step": 2, "tag": checkpoint.tag_for(2), "epoch": 0,
                            "batches": 4, "reason": "non-finite losses (last from asl, swav, mim, distill, loss)"}]
    # 4: step 3's batch, the 2 failed ones, and run.rollback_skip_batches=1 more
    assert _equal(_params(t.engine.module), good_weights)
    assert all(torch.equal(p, good_teacher[n]) for n, p in t.meta.teacher.named_parameters())
    assert checkpoint.nonfinite_state(t.engine, t.finite_also()) == ""
    sched = t.engine.lr_scheduler
    assert sched.last_epoch == 2  # the schedule went back with the step counter
    assert [g["lr"] for g in sched.optimizer.param_groups] == [0.5 * lr for lr in sched.get_last_lr()]
    out = capsys.readouterr().out
    assert "rolled back to" in out and "from step 3 to step_00000002" in out and "4 micro-batches per rank" in out

    # the run goes on: the LR is the schedule's again after the scaled step; the next save records the rollback
    t.loader = ListLoader(batches[6:8])
    assert t.train_one_epoch() is None and t.step == 4
    assert [g["lr"] for g in sched.optimizer.param_groups] == sched.get_last_lr()
    rows = _rows(t.out_dir)
    assert [r["train/rollback_skipped_batches"] for r in rows if "train/rollbacks" in r] == [4]
    client = safe_load.load_torch(t.ckpt_dir / checkpoint.tag_for(4) / checkpoint.MODEL_FILE)
    assert client["rollbacks"] == t.rollbacks and client["batches_seen"] == 8

    # run.max_rollbacks spent: the next spike stops the run (exit 4) and the bad state is not saved
    _corrupt(t)
    t.loader = ListLoader(batches[8:])
    assert t.train_one_epoch() == EXIT_NONFINITE
    assert "giving up: 1 rollback(s) already (run.max_rollbacks=1)" in capsys.readouterr().out
    assert (t.ckpt_dir / "latest").read_text() == checkpoint.tag_for(4)
    t.tracker.close()


# ----------------------------------------------------------------------------- 2 ranks, the deepspeed launcher

PLANT = '''
"""Planted by tests/train/test_nonfinite.py: NaN into rank 0's weights at its forward number FAULT_AT, and each
rank's final weights hashed at exit."""
import atexit, hashlib, os
import deepspeed

_init = deepspeed.initialize


def initialize(*args, **kwargs):
    out = _init(*args, **kwargs)
    engine, rank = out[0], int(os.environ.get("RANK", "0"))
    calls = [0]

    def pre_hook(module, inputs):
        calls[0] += 1
        if rank == 0 and calls[0] == int(os.environ["FAULT_AT"]):
            import torch
            with torch.no_grad():
                dict(module.named_parameters())["backbone.model.patch_embed.proj.weight"].view(-1)[0] = float("nan")

    engine.module.register_forward_pre_hook(pre_hook)

    def digest():
        h = hashlib.sha256()
        for name, p in engine.module.named_parameters():
            h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
        with open(os.path.join(os.environ["FAULT_OUT"], f"rank{rank}.sha"), "w") as f:
            f.write(h.hexdigest())

    atexit.register(digest)
    return out


deepspeed.initialize = initialize
'''


@pytest.mark.slow
def test_two_ranks_roll_back_a_nan_spike_finish_and_stay_identical(tmp_path):
    from subprocs import free_port, subprocess_env

    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(PLANT)
    out = tmp_path / "run"
    env = subprocess_env(FAULT_AT="5", FAULT_OUT=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([str(plant), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launchers/pretrain.py", "--config", "configs/test_tiny.yaml",
           "--set", f"run.output_dir={out}", "--set", "optim.max_steps=6", "--set", "optim.micro_batch_size=2",
           "--set", "run.checkpoint_every=3", "--set", "run.max_nonfinite_in_row=2", "--set", "tracking.enabled=false",
           "--set", "run.on_nonfinite=rollback", "--set", f"run.ds_config={ROOT / 'ds_configs/zero2.json'}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == EXIT_OK, log[-4000:]
    # forward 5 is step 5 (one forward per step): rank 0's weights turn NaN, steps 5 and 6 fail on both ranks,
    # both go back to step 3 and train steps 4-6 on the batches after the window
    assert "rolled back after 2 non-finite losses" in log and "from step 4 to step_00000003" in log, log[-4000:]
    rows = _rows(out)
    rb = [r for r in rows if "train/rollbacks" in r]
    assert len(rb) == 1 and rb[0]["train/rollback_from_step"] == 4 and rb[0]["train/rollback_to_step"] == 3
    assert rb[0]["train/rollback_skipped_batches"] == 3  # step 4's batch and the 2 failed ones
    assert max(r["step"] for r in rows if "loss" in r) == 6
    assert (out / "checkpoints" / "latest").read_text() == checkpoint.tag_for(6)
    h0, h1 = ((tmp_path / f"rank{r}.sha").read_text() for r in (0, 1))
    assert h0 == h1  # both ranks hold the same, finite weights (rank 0 alone was corrupted)
    client = safe_load.load_torch(out / "checkpoints" / checkpoint.tag_for(6) / checkpoint.MODEL_FILE)
    assert [(r["from_step"], r["to_step"], r["batches"]) for r in client["rollbacks"]] == [(4, 3, 3)]
    assert all(torch.isfinite(v).all() for v in client["module"].values())
