"""`hvpmtl doctor` through the launchers a run uses: `deepspeed --hostfile --launcher pdsh` over the loopback sshd,
and launchers/slurm/doctor.sbatch on the one-node Slurm. A healthy job passes (exit 0, one table on rank 0); faults
planted on one rank from outside the code (rank 1 started with another data index, another run.output_dir that
rank 0 cannot see, and HVPMTL_REVISION set to another revision) each fail the job with exit 7, naming host and rank;
an output_dir that cannot be created fails naming rank 0.

The loopback "cluster" is one machine: every rank sees the same files, so a node with another index or without
the shared mount is played by rank 1 given another path. The fault is planted by what starts rank 1 (a wrapper
script for pdsh, a wrapper interpreter as HVPMTL_PYTHON for Slurm), not by the doctor."""
from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from hvpmtl.data.formats.index_build import build_list_index

from .launch_env import REPO, VENV_PYTHON, launch_env, write_deepspeed_env
from .procs import log_tail, run_logged
from .slurm_cluster import TERMINAL_STATES
from .test_hostfile_launch import pdsh_launch_cmd
from .tiny_run import CONFIG, ONE_NODE_SBATCH

pytestmark = pytest.mark.cluster

ENTRY = REPO / "launchers" / "doctor.py"
HOST = socket.gethostname()
PASSED = "doctor: all 2 rank(s) on 1 host(s) passed"


def data_set(run_dir: Path) -> dict[str, Path]:
    """Two real data indexes of different list files: the job's and the one a stale node would have."""
    good = run_dir / "train.txt"
    good.write_text("a/1.jpg\t0:1\t2:0.9\nb/2.jpg\t1:1\n")
    stale = run_dir / "stale" / "train.txt"
    stale.parent.mkdir()
    stale.write_text("a/1.jpg\t0:1\n")
    return {"list": good, "index": build_list_index(good, num_classes=8, log=lambda m: None),
            "stale_index": build_list_index(stale, num_classes=8, log=lambda m: None)}


def doctor_args(run_dir: Path, data: dict, output_dir: Path | None = None) -> list[str]:
    return ["--config", str(CONFIG), "--set", "data.format=tencent", "--set", f"data.list_file={data['list']}",
            "--set", f"run.output_dir={output_dir or run_dir / 'run'}", "--timeout-s", "120"]


def rank1_faults(run_dir: Path, data: dict) -> tuple[dict, list[str]]:
    """What rank 1 is started with: another revision (environment), another index, an output_dir of its own."""
    return ({"HVPMTL_REVISION": "v0.0-planted"},
            ["--set", f"data.index={data['stale_index']}", "--set", f"run.output_dir={run_dir / 'node_local' / 'run'}"])


def assert_rank1_faults_named(text: str, data: dict) -> None:
    assert "doctor: 3 problem(s) on host(s)" in text, text[-4000:]
    assert f"{HOST} (rank 1): hvpmtl revision: v0.0-planted" in text, text[-4000:]
    assert f"{HOST} (rank 1): data index: {data['stale_index']} is sha256:" in text, text[-4000:]
    assert f"{HOST} (rank 1): run.output_dir: does not see rank 0's file" in text, text[-4000:]
    assert "(rank 0)" not in text.split("problem(s) on host(s)")[1], text[-4000:]


# ----------------------------------------------------------------------------- deepspeed --hostfile (pdsh)

def pdsh_doctor(sshd, run_dir: Path, entry: Path, args: list[str]) -> tuple[int, str]:
    hostfile = run_dir / "hosts"
    hostfile.write_text("localhost slots=2\n")
    env = launch_env(**sshd.ssh_env())
    write_deepspeed_env(run_dir, env)  # ssh starts the ranks with a clean environment
    log = run_dir / "doctor.log"
    rc = run_logged(pdsh_launch_cmd(sshd, hostfile, *args)[:-len(args) - 1] + [str(entry), *args], log,
                    timeout=600, env=env, cwd=run_dir, on_timeout=sshd.kill_sessions)
    text = log.read_text(errors="replace")
    assert "pdsh" in text, f"DeepSpeed did not launch through pdsh\n{log_tail(log, 40)}"
    return rc, text


def rank1_wrapper_script(run_dir: Path, env: dict, args: list[str]) -> Path:
    """A user script for deepspeed that runs launchers/doctor.py, rank 1 with `env` and `args` added."""
    path = run_dir / "doctor_rank1_fault.py"
    path.write_text(f"""import os, runpy, sys
if os.environ.get("RANK") == "1":
    os.environ.update({env!r})
    sys.argv += {args!r}
sys.argv[0] = {str(ENTRY)!r}
runpy.run_path({str(ENTRY)!r}, run_name="__main__")
""")
    return path


def test_pdsh_healthy_job_passes_with_one_table(sshd, run_dir):
    data = data_set(run_dir)
    rc, text = pdsh_doctor(sshd, run_dir, ENTRY, doctor_args(run_dir, data))
    assert rc == 0, text[-4000:]
    assert PASSED in text, text[-4000:]
    assert text.count("rank  host  revision") == 1, "only rank 0 prints the table"
    assert "over 2 rank(s)" in text and "bus bandwidth" in text
    assert f"data index (rank 0): {data['index']}, 2 samples, sha256:" in text
    assert not (run_dir / "run").exists(), "the doctor left its probe folder behind"


def test_pdsh_rank_with_another_index_revision_and_output_dir_fails_naming_it(sshd, run_dir):
    data = data_set(run_dir)
    env, extra = rank1_faults(run_dir, data)
    (run_dir / "node_local" / "run").mkdir(parents=True)  # rank 1's "local disk" copy, not the shared one
    rc, text = pdsh_doctor(sshd, run_dir, rank1_wrapper_script(run_dir, env, extra), doctor_args(run_dir, data))
    assert rc == 7, f"exit {rc}\n{text[-4000:]}"
    assert_rank1_faults_named(text, data)


# ----------------------------------------------------------------------------- Slurm: launchers/slurm/doctor.sbatch

def sbatch_doctor(slurm, run_dir: Path, args: list[str], python: str = VENV_PYTHON) -> tuple[dict, str]:
    env = launch_env(SLURM_CONF=str(slurm.conf), HVPMTL_PYTHON=python)
    job_id = slurm.sbatch([*ONE_NODE_SBATCH, f"--output={run_dir}/slurm-%j.out",
                           str(REPO / "launchers/slurm/doctor.sbatch"), *args], env=env, cwd=REPO)
    output = run_dir / f"slurm-{job_id}.out"
    info = slurm.wait_job(job_id, TERMINAL_STATES, timeout=600, logs=[output])
    return info, output.read_text(errors="replace")


def rank1_wrapper_python(run_dir: Path, env: dict, args: list[str]) -> Path:
    """An interpreter for HVPMTL_PYTHON: the venv's python, srun's task 1 started with `env` and `args` added."""
    path = run_dir / "python_rank1_fault"
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    extra = " ".join(f"'{a}'" for a in args)
    path.write_text(f"""#!/bin/bash
if [[ ${{SLURM_PROCID:-}} == 1 && ${{2:-}} == launchers/doctor.py ]]; then
  export {exports}
  exec {VENV_PYTHON} "$@" {extra}
fi
exec {VENV_PYTHON} "$@"
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_sbatch_healthy_job_passes(slurm, run_dir):
    data = data_set(run_dir)
    info, text = sbatch_doctor(slurm, run_dir, doctor_args(run_dir, data))
    assert (info["JobState"], info.get("ExitCode")) == ("COMPLETED", "0:0"), f"{info}\n{text[-4000:]}"
    assert PASSED in text and "doctor exited with code 0" in text, text[-4000:]
    assert text.count("rank  host  revision") == 1, text[-4000:]


def test_sbatch_rank_with_another_index_revision_and_output_dir_fails_naming_it(slurm, run_dir):
    data = data_set(run_dir)
    env, extra = rank1_faults(run_dir, data)
    (run_dir / "node_local" / "run").mkdir(parents=True)
    info, text = sbatch_doctor(slurm, run_dir, doctor_args(run_dir, data),
                               python=str(rank1_wrapper_python(run_dir, env, extra)))
    assert (info["JobState"], info.get("ExitCode")) == ("FAILED", "7:0"), f"{info}\n{text[-4000:]}"
    assert "doctor exited with code 7" in text and "requeue" not in text, text[-4000:]
    assert_rank1_faults_named(text, data)


def test_sbatch_output_dir_that_cannot_be_made_fails_naming_rank_0(slurm, run_dir):
    data = data_set(run_dir)
    blocker = run_dir / "not_a_dir"
    blocker.write_text("a file where the shared file system should be mounted\n")
    info, text = sbatch_doctor(slurm, run_dir, doctor_args(run_dir, data, output_dir=blocker / "run"))
    assert (info["JobState"], info.get("ExitCode")) == ("FAILED", "7:0"), f"{info}\n{text[-4000:]}"
    assert f"{HOST} (rank 0): run.output_dir: cannot create {blocker}/run: Not a directory" in text, text[-4000:]
    # rank 1 cannot write its own probe there either: named for it, not as "does not see rank 0's file"
    assert f"{HOST} (rank 1): run.output_dir: cannot write {blocker}/run/" in text, text[-4000:]
    assert "doctor: 2 problem(s)" in text, text[-4000:]
