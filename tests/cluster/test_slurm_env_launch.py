"""hvpmtl/slurm_env.py against the real Slurm: host lists expand as `scontrol show hostnames` does, and a rank
started as a multi-node srun task without a rendezvous address stops at once instead of waiting out the
collective timeout on 127.0.0.1."""
from __future__ import annotations

import subprocess

import pytest

from hvpmtl.slurm_env import expand_hostlist

from . import tiny_run
from .launch_env import VENV_PYTHON, launch_env
from .procs import run

pytestmark = pytest.mark.cluster

HOSTLISTS = ["node01", "node[01-04,07]", "node[8-10]", "node[098-101]", "n[01-2]", "n[1-02]", "a[1-2]b[3-4]",
             "n[1-2]-[3-4]", "gpu-a[001-002],login1", "a[01-02],b", "n[1,3-4],m[7-8]", "127.0.0.[1-2]", "x[9-12]"]


def test_hostlists_expand_as_scontrol_expands_them(slurm):
    for hostlist in HOSTLISTS:
        want = run(["scontrol", "show", "hostnames", hostlist], timeout=15, env=slurm.env).stdout.split()
        assert expand_hostlist(hostlist) == want, hostlist


def test_multi_node_srun_task_without_master_addr_stops_with_a_clear_message(run_dir):
    # what srun gives rank 0 of a 2-node job whose custom batch script exported no MASTER_ADDR and whose node
    # list is not there either (before: MASTER_ADDR defaulted to 127.0.0.1 and rank 0 waited for rank 1 there)
    env = launch_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_NNODES="2",
                     SLURM_STEP_NUM_NODES="2", SLURM_JOB_ID="77")
    try:
        cp = subprocess.run([VENV_PYTHON, str(tiny_run.ENTRY), *tiny_run.pretrain_args(run_dir / "run")], env=env,
                            capture_output=True, text=True, timeout=300, cwd=run_dir)
    except subprocess.TimeoutExpired as e:  # a hang guard, not a timing assert
        raise AssertionError(f"the rank waited for a rendezvous instead of stopping:\n{e.stderr}") from None
    assert cp.returncode == 2, cp.stderr[-3000:]
    assert "2-node Slurm job without MASTER_ADDR" in cp.stderr, cp.stderr[-3000:]
    assert "Traceback" not in cp.stderr, cp.stderr[-3000:]
