"""A real one-node Slurm (munged, slurmctld, slurmd) on 127.0.0.1, in a directory of its own.

It touches nothing of the system's: its own munge key and socket (slurm.conf's AuthInfo points
at it), its own ports, state and spool directories, and SLURM_CONF for every client. The node
is `localhost` with 2 CPUs and no GPUs, like the one-node setup in docs/CLUSTER.md.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .procs import Daemon, free_port, log_tail, logs_tail, run, wait_until

SLURM_CONF_TEMPLATE = """\
# One-node test cluster (written by tests/cluster/slurm_cluster.py)
ClusterName=hvpmtltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (cred_expire + 1 s):
# 120 s by default, 10 s here
AuthInfo=socket={munge_socket},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# quick turnaround for a test cluster: short kill wait, no minimum job age
KillWait=10
MinJobAge=300
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES State=UP MaxTime=INFINITE
"""

TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED")

REQUIRED = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def _which(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if not path:
        raise AssertionError(f"'{name}' not found: install the cluster test packages with "
                             f"`bash tools/install_system_deps.sh` (as root)")
    return path


def _total_mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


class OneNodeSlurm:
    """Start with start(), stop with stop(); `env` is os.environ plus SLURM_CONF."""

    def __init__(self, workdir: Path, cpus: int = 2):
        self.dir = Path(workdir)
        self.cpus = cpus
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.daemons: list[Daemon] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":  # a test run from inside a Slurm job must not leak that job's settings
                del self.env[k]
        self.env["SLURM_CONF"] = str(self.conf)

    @property
    def logs(self) -> list[Path]:
        return [self.dir / n for n in ("munged.log", "slurmctld.log", "slurmctld.out", "slurmd.log", "slurmd.out")]

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> "OneNodeSlurm":
        if os.geteuid() != 0:
            raise AssertionError("the cluster tests start slurmd, which runs jobs as root: run them as root")
        paths = {n: _which(n) for n in REQUIRED}
        for sub in ("state", "spool", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # munged wants every directory above its socket searchable by all
        os.chmod(self.dir, 0o755)
        os.chmod(self.dir / "munge", 0o755)
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        mem_mb = max(1024, int(_total_mem_mb() * 0.8))
        self.conf.write_text(SLURM_CONF_TEMPLATE.format(
            ctld_port=free_port(), slurmd_port=free_port(), munge_socket=self.munge_socket,
            dir=self.dir, cpus=self.cpus, mem_mb=mem_mb))
        try:
            munged = self._daemon("munged", [paths["munged"], "-F", f"--socket={self.munge_socket}",
                                             f"--key-file={key}", f"--pid-file={self.dir}/munge/munged.pid",
                                             f"--seed-file={self.dir}/munge/munged.seed"], "munged.log")
            wait_until(lambda: munged.check_alive() or self.munge_socket.exists(), timeout,
                       "munged's socket", self.logs)
            ctld = self._daemon("slurmctld", [paths["slurmctld"], "-D", "-c", "-f", str(self.conf)], "slurmctld.out")
            wait_until(lambda: ctld.check_alive() or self._scontrol_ok("ping"), timeout,
                       "slurmctld to answer `scontrol ping`", self.logs)
            slurmd = self._daemon("slurmd", [paths["slurmd"], "-D", "-f", str(self.conf), "-N", "localhost"],
                                  "slurmd.out")
            wait_until(lambda: slurmd.check_alive() or self.node_state().startswith("IDLE"), timeout,
                       "node localhost to be IDLE", self.logs)
            # one real step end to end: munge credentials, slurmd, slurmstepd
            out = run(["srun", "-N1", "-n1", "--time=1", "hostname"], timeout=timeout, env=self.env).stdout
            assert out.strip(), f"srun printed nothing\n{logs_tail(self.logs)}"
        except BaseException:
            self.stop()
            raise
        return self

    def _daemon(self, name: str, cmd: list[str], log: str) -> Daemon:
        d = Daemon(name, cmd, self.dir / log, env=self.env)
        self.daemons.append(d)
        return d

    def stop(self):
        # jobs first, so nothing we started keeps running after the daemons are gone
        if self.daemons and all(d.alive() for d in self.daemons):
            run(["scancel", "--full", "--signal=KILL", "--user=root"], timeout=15, env=self.env, check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.squeue_ids():
                time.sleep(0.3)
        for d in reversed(self.daemons):
            d.stop()
        self.daemons.clear()

    # ------------------------------------------------------------------ queries
    def _scontrol_ok(self, *args: str) -> bool:
        return run(["scontrol", *args], timeout=10, env=self.env, check=False).returncode == 0

    def node_state(self) -> str:
        cp = run(["sinfo", "-h", "-N", "-n", "localhost", "-o", "%T"], timeout=10, env=self.env, check=False)
        return cp.stdout.strip().upper() if cp.returncode == 0 else ""

    def squeue_ids(self) -> list[str]:
        cp = run(["squeue", "-h", "-o", "%i"], timeout=10, env=self.env, check=False)
        return cp.stdout.split() if cp.returncode == 0 else []

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...); {} once purged."""
        cp = run(["scontrol", "show", "job", "-o", str(job_id)], timeout=10, env=self.env, check=False)
        if cp.returncode != 0:
            return {}
        fields = {}
        for token in cp.stdout.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields[k] = v
        return fields

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], env: dict, cwd: Path, timeout: float = 30) -> str:
        cp = run(["sbatch", "--parsable", *args], timeout=timeout, env=env, cwd=cwd, check=False)
        if cp.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}\n"
                                 f"{logs_tail(self.logs)}")
        return cp.stdout.strip().split(";")[0]

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float, logs=(), what: str = "") -> dict:
        """Wait until the job is in one of `states`; on timeout cancel it and show the logs."""
        def reached():
            info = self.job(job_id)
            return info if info.get("JobState") in states else None
        try:
            return wait_until(reached, timeout, what or f"job {job_id} to reach {'/'.join(states)}",
                              [*logs, *self.logs], interval=0.5)
        except AssertionError as e:
            info = self.job(job_id)
            self.cancel(job_id)
            raise AssertionError(f"{e}\njob {job_id}: {info}") from None

    def wait_finished(self, job_id: str, timeout: float, output: Path) -> dict:
        """Wait for a terminal state; anything but COMPLETED with exit code 0 fails with the job's output."""
        info = self.wait_job(job_id, TERMINAL_STATES, timeout, logs=[output])
        assert info["JobState"] == "COMPLETED" and info.get("ExitCode") == "0:0", (
            f"job {job_id} ended {info['JobState']} with exit code {info.get('ExitCode')}\n{log_tail(output, 60)}")
        return info

    def cancel(self, job_id: str):
        run(["scancel", "--full", "--signal=KILL", str(job_id)], timeout=15, env=self.env, check=False)
        run(["scancel", str(job_id)], timeout=15, env=self.env, check=False)

