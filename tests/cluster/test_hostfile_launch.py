"""`deepspeed --hostfile --launcher pdsh`: ranks reach their node over ssh, get .deepspeed_env, train as one job.

The hostfile names `localhost slots=2`; --force_multi makes DeepSpeed go through pdsh and ssh
(our loopback sshd) instead of launching locally, exactly as it does for a list of real nodes.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from . import tiny_run
from .launch_env import VENV_BIN, launch_env, write_deepspeed_env
from .mlflow_runs import finished_runs
from .procs import free_port, log_tail, run_logged

pytestmark = pytest.mark.cluster


def pdsh_launch_cmd(sshd, hostfile: Path, *args: str) -> list[str]:
    return [f"{VENV_BIN}/deepspeed", "--hostfile", str(hostfile), "--force_multi", "--launcher", "pdsh",
            "--no_ssh_check", "--ssh_port", str(sshd.port), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(tiny_run.ENTRY), *args]


def test_pdsh_hostfile_run_matches_local_run_and_gets_deepspeed_env(sshd, run_dir, reference_metrics):
    hostfile = run_dir / "hosts"
    hostfile.write_text("localhost slots=2\n")
    # The MLflow URI reaches the ranks only through .deepspeed_env (ssh starts them with a clean
    # environment): the run showing up in this database proves the file was applied on the node.
    db = run_dir / "tracking" / "via_deepspeed_env.db"
    db.parent.mkdir()
    env = launch_env(**sshd.ssh_env(), MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    write_deepspeed_env(run_dir, env)
    del env["MLFLOW_TRACKING_URI"]
    out = run_dir / "run"
    log = run_dir / "launcher.log"
    rc = run_logged(pdsh_launch_cmd(sshd, hostfile, *tiny_run.pretrain_args(out, tracking=True)),
                    log, timeout=600, env=env, cwd=run_dir, on_timeout=sshd.kill_sessions)
    assert rc == 0, f"deepspeed --launcher pdsh exited {rc}\n{log_tail(log, 60)}"
    assert "pdsh" in log.read_text(), "DeepSpeed did not launch through pdsh"

    # both ranks took part (global batch = 2 x micro batch) and trained exactly like a local launch
    assert "2 rank(s)" in log.read_text(), log_tail(log, 60)
    tiny_run.assert_same_losses(tiny_run.read_metrics(out), reference_metrics, range(1, tiny_run.STEPS + 1),
                                "pdsh-launched run")
    runs = finished_runs(f"sqlite:///{db}")
    assert len(runs) == 1, f"expected one finished MLflow run in {db}, got {runs}"
    assert not (run_dir / "mlflow.db").exists(), "the ranks used the default tracking URI, not .deepspeed_env's"
