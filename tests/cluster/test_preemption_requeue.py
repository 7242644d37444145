"""Preemption on Slurm: SIGUSR1 to the job's tasks -> checkpoint + exit 3 -> the sbatch script requeues
the job -> the restart resumes with --resume auto from that checkpoint and finishes, with the same
losses as an uninterrupted run and one continuous MLflow run."""
from __future__ import annotations

import re

import pytest

from . import tiny_run
from .launch_env import REPO
from .mlflow_runs import all_runs, metric_steps
from .procs import log_tail, run, wait_until

pytestmark = pytest.mark.cluster


def test_usr1_checkpoints_exits_3_requeues_and_resumes_exactly(slurm, run_dir, reference_metrics):
    out = run_dir / "run"
    env = tiny_run.slurm_job_env(slurm.conf, out, tracking=True)
    job_id = slurm.sbatch([*tiny_run.ONE_NODE_SBATCH, "--time=20", f"--output={run_dir}/slurm-%j.out",
                           str(REPO / "launchers/slurm/pretrain.sbatch")], env=env, cwd=REPO)
    output = run_dir / f"slurm-{job_id}.out"
    logs = [output, *slurm.logs]

    def training_started():
        info = slurm.job(job_id)
        assert info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), (
            f"job {job_id} left before it was signalled: {info}\n{log_tail(output, 60)}")
        return tiny_run.last_step(out) >= 1
    try:
        wait_until(training_started, 300, f"job {job_id} to log its first step", logs, interval=0.3)
        # what `#SBATCH --signal=USR1@120` does before the time limit: signal every task, not the batch shell
        run(["scancel", "--signal=USR1", job_id], timeout=15, env=slurm.env)

        def requeued():
            info = slurm.job(job_id)
            assert info.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), (
                f"job {job_id} ended instead of being requeued: {info}\n{log_tail(output, 60)}")
            return int(info.get("Restarts", "0")) >= 1
        wait_until(requeued, 240, f"job {job_id} to be requeued after SIGUSR1", logs, interval=0.3)
    except BaseException:
        slurm.cancel(job_id)
        raise
    text = output.read_text()
    assert "training exited with code 3" in text and "requeueing job" in text, log_tail(output, 60)
    found = re.search(r"preempted at step (\d+)", text)
    assert found, f"no 'preempted at step' message\n{log_tail(output, 60)}"
    preempted_at = int(found.group(1))
    assert 1 <= preempted_at < tiny_run.STEPS, f"preempted at step {preempted_at}"

    # a requeued job waits cred_expire + 1 s before it starts again (121 s by default, 11 s on the test cluster)
    slurm.wait_finished(job_id, timeout=300, output=output)
    text = output.read_text()
    restart_line = next((line for line in text.splitlines() if f"job {job_id} start 1:" in line), "")
    assert restart_line.endswith("resume auto"), f"restart line: {restart_line!r}\n{log_tail(output, 60)}"
    assert f"resumed from {out / 'checkpoints' / f'step_{preempted_at:08d}'}" in text, log_tail(output, 60)

    # steps 1..P before the requeue, P+1..end after it: each logged once, in order, as in an uninterrupted run
    rows = tiny_run.read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, tiny_run.STEPS + 1)), (
        f"steps logged: {[r['step'] for r in rows]} (preempted at {preempted_at})")
    tiny_run.assert_same_losses(rows, reference_metrics, range(1, tiny_run.STEPS + 1),
                                f"run preempted at step {preempted_at} and resumed")
    assert tiny_run.latest_tag(out) == f"step_{tiny_run.STEPS:08d}"

    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    runs = all_runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED"], f"expected one MLflow run continued after requeue: {runs}"
    assert metric_steps(uri, runs[0].info.run_id) == list(range(1, tiny_run.STEPS + 1))
