"""Session fixtures for the cluster tests: a one-node Slurm and a loopback sshd, both on 127.0.0.1.

They start on first use, live in one directory under /tmp (munged needs every directory above
its socket searchable by all, which pytest's 0700 tmp_path is not) and are stopped, with every
job and remote rank they ran, when the session ends. Set HVPMTL_KEEP_CLUSTER_DIR=1 to keep the
directory (logs, slurm.conf, job outputs) for a look afterwards.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from . import tiny_run
from .launch_env import launch_env
from .procs import log_tail, run_logged
from .slurm_cluster import OneNodeSlurm
from .ssh_loopback import LoopbackSshd


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster_dir():
    d = Path(tempfile.mkdtemp(prefix="hvpmtl-cluster-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    if os.environ.get("HVPMTL_KEEP_CLUSTER_DIR"):
        print(f"\ncluster test directory kept: {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm(cluster_dir):
    cluster = OneNodeSlurm(cluster_dir / "slurm").start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def sshd(cluster_dir):
    server = LoopbackSshd(cluster_dir / "ssh").start()
    yield server
    server.stop()


@pytest.fixture
def run_dir(cluster_dir, request):
    """A fresh directory per test, readable by the Slurm daemons (unlike tmp_path)."""
    d = cluster_dir / "runs" / request.node.name
    d.mkdir(parents=True, exist_ok=False)
    return d


@pytest.fixture(scope="session")
def reference_metrics(cluster_dir) -> dict[int, dict]:
    """The tiny 2-rank run, uninterrupted, launched locally: {step: metrics row}."""
    d = cluster_dir / "reference"
    d.mkdir()
    out = d / "run"
    log = d / "launcher.log"
    rc = run_logged(tiny_run.deepspeed_local_cmd(*tiny_run.pretrain_args(out)), log, timeout=600,
                    env=launch_env(), cwd=d)
    assert rc == 0, f"reference run exited {rc}\n{log_tail(log, 60)}"
    ref = tiny_run.by_step(tiny_run.read_metrics(out))
    assert sorted(ref) == list(range(1, tiny_run.STEPS + 1)), f"reference run logged steps {sorted(ref)}"
    return ref
