"""hvpmtl/slurm_env.py: Slurm host lists expanded as `scontrol show hostnames` does (the cross-check against the
real scontrol is in tests/cluster/test_slurm_env_launch.py), and the srun -> torch.distributed mapping."""
from __future__ import annotations

import pytest

from hvpmtl.config import ConfigError
from hvpmtl.slurm_env import LaunchError, expand_hostlist, map_slurm_env

# expected values written out by hand from Slurm's hostlist rules
HOSTLISTS = {
    "node01": ["node01"],
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "node[8-10]": ["node8", "node9", "node10"],
    "node[098-101]": ["node098", "node099", "node100", "node101"],
    "n[01-2]": ["n01", "n02"],
    "n[1-02]": ["n1", "n2"],
    "a[1-2]b[3-4]": ["a1b3", "a1b4", "a2b3", "a2b4"],
    "n[1-2]-[3-4]": ["n1-3", "n1-4", "n2-3", "n2-4"],
    "gpu-a[001-002],login1": ["gpu-a001", "gpu-a002", "login1"],
    "a[01-02],b": ["a01", "a02", "b"],
    "127.0.0.[1-2]": ["127.0.0.1", "127.0.0.2"],
}


@pytest.mark.parametrize("hostlist", sorted(HOSTLISTS))
def test_expand_hostlist(hostlist):
    assert expand_hostlist(hostlist) == HOSTLISTS[hostlist]


@pytest.mark.parametrize("bad", ["node[1-2", "node]1", "n[3-1]", "n[a-b]", "n[]", "a,,b", "n[[1]]"])
def test_expand_hostlist_refuses_malformed_lists_with_the_list_named(bad):
    with pytest.raises(LaunchError, match="invalid Slurm host list"):
        expand_hostlist(bad)


def srun_task(**extra) -> dict:
    """What srun gives task 9 of a 2-node x 8-task step (SLURM_* only, no MASTER_*)."""
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NODELIST": "gpu[07-08]"}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def test_multi_node_task_without_master_addr_rendezvous_at_the_first_node():
    env = srun_task()
    map_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("9", "16", "1")
    assert env["MASTER_ADDR"] == "gpu07"
    assert env["MASTER_PORT"] == str(20000 + 4242 % 40000)


def test_the_step_nodelist_wins_over_the_job_nodelist():
    # `srun -w gpu08 ...` inside a larger allocation: task 0 runs on the step's first node
    env = srun_task(SLURM_STEP_NODELIST="gpu[08-09]", SLURM_NODELIST="gpu[08-09]", SLURM_JOB_NODELIST="gpu[07-09]")
    map_slurm_env(env)
    assert env["MASTER_ADDR"] == "gpu08"


def test_an_exported_master_addr_is_kept():
    env = srun_task(MASTER_ADDR="gpu07-ib", MASTER_PORT="29500")
    map_slurm_env(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07-ib", "29500")


def test_multi_node_task_without_any_node_list_fails_at_once_naming_the_fix():
    env = srun_task(SLURM_JOB_NODELIST=None, SLURM_STEP_NODELIST=None, SLURM_NODELIST=None)
    with pytest.raises(LaunchError, match="2-node Slurm job without MASTER_ADDR") as e:
        map_slurm_env(env)
    assert "MASTER_ADDR=<first node>" in str(e.value)
    assert isinstance(e.value, ConfigError)  # the launchers turn it into a message and exit 2


@pytest.mark.parametrize("loopback", ["127.0.0.1", "localhost"])
def test_loopback_master_addr_on_a_multi_node_job_is_refused(loopback):
    # e.g. inherited from the login shell through sbatch's default --export=ALL
    with pytest.raises(LaunchError, match=f"MASTER_ADDR={loopback} on a 2-node Slurm job"):
        map_slurm_env(srun_task(MASTER_ADDR=loopback))


def test_single_node_task_rendezvous_on_loopback():
    env = srun_task(SLURM_NNODES="1", SLURM_STEP_NUM_NODES="1", SLURM_JOB_NUM_NODES="1",
                    SLURM_JOB_NODELIST="gpu07", SLURM_STEP_NODELIST="gpu07", SLURM_NODELIST="gpu07")
    map_slurm_env(env)
    assert env["MASTER_ADDR"] == "127.0.0.1"


def test_a_launcher_that_set_rank_is_left_alone():
    env = srun_task(RANK="3", MASTER_ADDR="10.0.0.1")
    before = dict(env)
    map_slurm_env(env)
    assert env == before


def test_gpus_per_task_is_refused_before_cuda_set_up():
    # --gpus-per-task=1: task 1 of the node sees one GPU (its own) and would ask for cuda:1
    env = srun_task(CUDA_VISIBLE_DEVICES="1", SLURM_GPUS_PER_TASK="1")
    with pytest.raises(LaunchError, match=r"SLURM_LOCALID=1 sees 1 GPU\(s\).*--gpus-per-task=1"):
        map_slurm_env(env)


def test_every_task_seeing_all_node_gpus_is_fine():
    env = srun_task(CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    map_slurm_env(env)
    assert env["LOCAL_RANK"] == "1"
