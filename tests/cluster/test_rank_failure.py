"""A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-run: the other rank must stop on its own within
run.collective_timeout_s with an error naming the lost rank, not wait forever.

The two ranks are started directly with RANK/WORLD_SIZE/MASTER_* (as torchrun or srun would set
them), without deepspeed's launcher: that launcher kills every rank as soon as one exits, which
would hide whether the engine itself notices.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from . import tiny_run
from .launch_env import VENV_PYTHON, launch_env
from .procs import free_port, kill_group, log_tail, wait_until

pytestmark = pytest.mark.cluster

COLLECTIVE_TIMEOUT_S = 20
GRACE_S = 90  # start-up noise on a loaded 2-core machine; a hang is anything past timeout + grace


def _finetune_args(run_dir, out) -> list[str]:
    """A long single-label fine-tuning from random init on a small object-centric ImageFolder."""
    from hvpmtl.data.tools.synthetic import write_imagefolder

    write_imagefolder(run_dir / "imagefolder", 36, 18)
    sets = {"model.random_init": "true", "data.train_dir": run_dir / "imagefolder/train",
            "data.val_dir": run_dir / "imagefolder/val", "optim.epochs": 200, "optim.micro_batch_size": 2,
            "run.output_dir": out, "run.ds_config": tiny_run.REPO / "ds_configs/zero2.json",
            "run.checkpoint_every_epochs": 1000, "run.collective_timeout_s": COLLECTIVE_TIMEOUT_S,
            "tracking.enabled": "false"}
    return ["--config", str(tiny_run.REPO / "configs/finetune_tiny.yaml"),
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


TRAINERS = {"pretrain": tiny_run.ENTRY, "finetune": tiny_run.REPO / "launchers/finetune.py"}


@pytest.mark.parametrize("trainer", list(TRAINERS))
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_surviving_rank_fails_naming_the_lost_rank_instead_of_hanging(run_dir, sig, trainer):
    """Both trainers run on one loop: the survivor exits 5 (EXIT_PEER_LOST) naming the lost rank."""
    out = run_dir / "run"
    if trainer == "pretrain":
        args = tiny_run.pretrain_args(out, steps=500, **{"run.collective_timeout_s": COLLECTIVE_TIMEOUT_S,
                                                         "run.checkpoint_every": 1000})
    else:
        args = _finetune_args(run_dir, out)
    port = str(free_port())
    procs, logs = [], []
    try:
        for rank in range(2):
            env = launch_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=port)
            logs.append(run_dir / f"rank{rank}.log")
            with open(logs[-1], "ab") as f:
                procs.append(subprocess.Popen([VENV_PYTHON, "-u", str(TRAINERS[trainer]), *args], stdout=f,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                              cwd=run_dir, start_new_session=True))

        def training():
            for r, p in enumerate(procs):
                assert p.poll() is None, f"rank {r} exited {p.returncode} early\n{log_tail(logs[r], 60)}"
            return tiny_run.last_step(out) >= 2
        wait_until(training, 400, "two training steps", logs, interval=0.2)

        survivor_log_start = logs[0].stat().st_size
        os.kill(procs[1].pid, sig)
        t0 = time.monotonic()
        try:
            rc = procs[0].wait(COLLECTIVE_TIMEOUT_S + GRACE_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"rank 0 still running {COLLECTIVE_TIMEOUT_S + GRACE_S}s after rank 1 got {sig.name} "
                f"(run.collective_timeout_s={COLLECTIVE_TIMEOUT_S}): it hangs\n{log_tail(logs[0], 40)}") from None
        waited = time.monotonic() - t0
        after = logs[0].read_bytes()[survivor_log_start:].decode(errors="replace")
        assert rc == 5, f"rank 0 exited {rc} after losing rank 1 (5 is documented)\n{after[-4000:]}"
        assert re.search(r"\brank\s*1\b", after, re.IGNORECASE), (
            f"rank 0 exited {rc} {waited:.0f}s after rank 1 got {sig.name}, but its error does not name rank 1:\n"
            f"{after[-4000:]}")
    finally:
        for p in procs:
            kill_group(p, signal.SIGKILL)
            p.wait(30)
