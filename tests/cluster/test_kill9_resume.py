"""A 2-rank run killed with SIGKILL (launcher and ranks at once, like a lost node) at a random step after
its first checkpoint, restarted with --resume auto, continues with exactly the uninterrupted losses."""
from __future__ import annotations

import os
import random
import signal
import subprocess

import pytest

from . import tiny_run
from .launch_env import launch_env
from .procs import kill_group, log_tail, run_logged, wait_until

pytestmark = pytest.mark.cluster


def test_sigkill_at_random_step_then_resume_auto_matches_uninterrupted_run(run_dir, reference_metrics):
    out = run_dir / "run"
    log = run_dir / "launcher.log"
    # after the first checkpoint (step 2), and two steps before the end so the kill lands mid-run
    kill_step = random.Random(os.urandom(8)).randint(tiny_run.CHECKPOINT_EVERY + 1, tiny_run.STEPS - 2)
    print(f"killing at step {kill_step}")
    env = launch_env()
    with open(log, "ab") as f:
        proc = subprocess.Popen(tiny_run.deepspeed_local_cmd(*tiny_run.pretrain_args(out)), stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=run_dir,
                                start_new_session=True)
    try:
        def reached():
            assert proc.poll() is None, (
                f"run ended (exit {proc.returncode}) before step {kill_step}\n{log_tail(log, 60)}")
            return tiny_run.last_step(out) >= kill_step and tiny_run.latest_tag(out)
        wait_until(reached, 400, f"step {kill_step}", [log], interval=0.1)
    finally:
        kill_group(proc, signal.SIGKILL)  # deepspeed runner, launcher and both ranks share the group
        proc.wait(30)
    killed_after = tiny_run.last_step(out)
    lines_before = tiny_run.metrics_lines(out)
    tag = tiny_run.latest_tag(out)
    resume_step = int(tag.removeprefix("step_"))
    assert tiny_run.CHECKPOINT_EVERY <= resume_step <= killed_after < tiny_run.STEPS, (tag, killed_after)

    rc = run_logged(tiny_run.deepspeed_local_cmd(*tiny_run.pretrain_args(out), "--resume", "auto"), log, timeout=400,
                    env=env, cwd=run_dir)
    assert rc == 0, f"resumed run exited {rc}\n{log_tail(log, 60)}"
    assert f"resumed from {out / 'checkpoints' / tag}" in log.read_text(), log_tail(log, 60)
    resumed = tiny_run.read_metrics(out, skip_lines=lines_before)
    steps = list(range(resume_step + 1, tiny_run.STEPS + 1))
    assert [r["step"] for r in resumed] == steps, f"steps logged after resume: {[r['step'] for r in resumed]}"
    tiny_run.assert_same_losses(resumed, reference_metrics, steps,
                                f"run killed after step {killed_after} and resumed from {tag}")
    tiny_run.assert_same_losses(tiny_run.read_metrics(out)[:lines_before], reference_metrics,
                                range(1, killed_after + 1), "run before the kill")
