"""The Slurm scripts on a real (one-node, CPU) Slurm: a job trains, checkpoints, logs to MLflow, and its
srun'd ranks, which see only SLURM_* variables, train exactly like a local 2-rank launch."""
from __future__ import annotations

import pytest

from . import tiny_run
from .launch_env import REPO
from .mlflow_runs import finished_runs, metric_steps
from .procs import log_tail, run
from .slurm_cluster import TERMINAL_STATES

pytestmark = pytest.mark.cluster

ONE_NODE = tiny_run.ONE_NODE_SBATCH


def test_pretrain_sbatch_submits_itself_trains_checkpoints_and_logs_to_mlflow(slurm, run_dir, reference_metrics):
    out = run_dir / "run"
    job_log = run_dir / "slurm-%j.out"
    # `bash pretrain.sbatch [sbatch options]` submits itself with the settings from the environment
    cp = run(["bash", str(REPO / "launchers/slurm/pretrain.sbatch"), "--parsable", *ONE_NODE, f"--output={job_log}"],
             timeout=30, env=tiny_run.slurm_job_env(slurm.conf, out, tracking=True), cwd=run_dir)
    job_id = cp.stdout.strip().split(";")[0]
    output = run_dir / f"slurm-{job_id}.out"
    slurm.wait_finished(job_id, timeout=600, output=output)
    text = output.read_text()
    assert "training exited with code 0" in text, log_tail(output, 60)
    assert "2 rank(s)" in text, log_tail(output, 60)

    tiny_run.assert_same_losses(tiny_run.read_metrics(out), reference_metrics, range(1, tiny_run.STEPS + 1),
                                "srun-launched run")
    assert tiny_run.latest_tag(out) == f"step_{tiny_run.STEPS:08d}"
    assert f"step_{tiny_run.STEPS:08d}" in tiny_run.checkpoint_tags(out)
    assert (out / "config.yaml").is_file()
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"  # the default: beside run.output_dir
    runs = finished_runs(uri)
    assert len(runs) == 1, f"expected one finished MLflow run at {uri}, got {runs}"
    assert runs[0].data.tags.get("world_size") == "2"
    assert metric_steps(uri, runs[0].info.run_id) == list(range(1, tiny_run.STEPS + 1))


def test_ds_launcher_sbatch_runs_ranks_through_deepspeed_launcher_slurm(slurm, run_dir, reference_metrics):
    out = run_dir / "run"
    env = tiny_run.slurm_job_env(slurm.conf, out)
    job_id = slurm.sbatch([*ONE_NODE, "--time=20", f"--output={run_dir}/slurm-%j.out",
                           str(REPO / "launchers/slurm/pretrain_ds_launcher.sbatch")], env=env, cwd=REPO)
    output = run_dir / f"slurm-{job_id}.out"
    slurm.wait_finished(job_id, timeout=600, output=output)
    text = output.read_text()
    assert "cmd = srun -n 2" in text, f"DeepSpeed did not launch through srun\n{log_tail(output, 60)}"
    assert "training exited with code 0" in text, log_tail(output, 60)
    tiny_run.assert_same_losses(tiny_run.read_metrics(out), reference_metrics, range(1, tiny_run.STEPS + 1),
                                "deepspeed --launcher slurm run")
    assert tiny_run.latest_tag(out) == f"step_{tiny_run.STEPS:08d}"


def test_finetune_sbatch_config_error_fails_the_job_with_code_2_and_no_requeue(slurm, run_dir):
    # no model.init and no data dirs: launchers/finetune.py refuses the config on every rank
    env = tiny_run.slurm_job_env(slurm.conf, run_dir / "run")
    env.update(CONFIG=str(REPO / "configs/finetune_tiny.yaml"), EXTRA_ARGS=f"--set run.output_dir={run_dir / 'run'}")
    job_id = slurm.sbatch([*ONE_NODE, "--time=5", f"--output={run_dir}/slurm-%j.out",
                           str(REPO / "launchers/slurm/finetune.sbatch")], env=env, cwd=REPO)
    output = run_dir / f"slurm-{job_id}.out"
    info = slurm.wait_job(job_id, TERMINAL_STATES, timeout=300, logs=[output])
    text = output.read_text()
    assert (info["JobState"], info.get("ExitCode"), info.get("Restarts")) == ("FAILED", "2:0", "0"), (
        f"{info}\n{log_tail(output, 40)}")
    assert "config error" in text and "model.init" in text, log_tail(output, 40)
    assert "training exited with code 2" in text and "requeueing" not in text, log_tail(output, 40)
