"""The Slurm scripts on a real (one-node, CPU) Slurm: the README's sbatch line trains, checkpoints and logs to
MLflow with the checkout's own environment, and srun'd ranks, which see only SLURM_* variables, train exactly like
a local 2-rank launch."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from docs.checkout import make_checkout  # tests/docs: a checkout with its own .venv, as after `make setup`
from docs.commands import documented_commands

from . import tiny_run
from .launch_env import REPO, launch_env
from .mlflow_runs import finished_runs, metric_steps
from .procs import log_tail, run
from .slurm_cluster import TERMINAL_STATES

pytestmark = pytest.mark.cluster

ONE_NODE = tiny_run.ONE_NODE_SBATCH


def readme_sbatch_line() -> list[str]:
    """The README's first `sbatch ... launchers/slurm/pretrain.sbatch ...` command, as tokens."""
    lines = [c.argv for c in documented_commands(REPO / "README.md", REPO)
             if c.argv[0] == "sbatch" and "launchers/slurm/pretrain.sbatch" in c.argv]
    assert lines, "README.md documents no `sbatch ... launchers/slurm/pretrain.sbatch` command"
    return lines[0]


def documented_sbatch_cmd(output_dir: Path, *more: str) -> list[str]:
    """The README's line, GPU and node request aside (the test node has 2 CPUs and no GPU), plus the tiny run."""
    tokens = readme_sbatch_line()
    script = tokens.index("launchers/slurm/pretrain.sbatch")
    options = tokens[1:script]
    assert all(o.startswith("--nodes") or o.isdigit() for o in options), (
        f"the README's sbatch line sets more than the node count: {options}")
    return ["sbatch", "--parsable", *ONE_NODE, *tokens[script:], *tiny_run.pretrain_args(output_dir, tracking=True),
            *more]


def job_env(slurm) -> dict:
    env = launch_env(SLURM_CONF=str(slurm.conf))
    del env["HVPMTL_PYTHON"]  # the scripts must find the checkout's .venv themselves
    del env["OMP_NUM_THREADS"]  # and give OpenMP the task's CPUs
    return env


def test_readme_sbatch_line_trains_checkpoints_and_logs_to_mlflow_with_the_checkouts_venv(
        slurm, run_dir, reference_metrics):
    root = make_checkout(run_dir)
    out = run_dir / "run"
    # a value with spaces (and a comma) must reach the launcher as one argument
    cmd = documented_sbatch_cmd(out, "--set", "run.name=tiny run, with spaces")
    cp = run(cmd, timeout=30, env=job_env(slurm), cwd=root)
    job_id = cp.stdout.strip().split(";")[0]
    output = root / f"slurm-hvpmtl-pretrain-{job_id}.out"  # the script's own --output, in the submit directory
    slurm.wait_finished(job_id, timeout=600, output=output)
    text = output.read_text()
    assert "training exited with code 0" in text, log_tail(output, 60)
    assert "2 rank(s)" in text, log_tail(output, 60)
    assert f"python {root}/.venv/bin/python," in text, log_tail(output, 60)
    assert "0 GPU(s) per node" in text, log_tail(output, 60)
    assert "OMP_NUM_THREADS=1 SRUN_CPUS_PER_TASK=1," in text, log_tail(output, 60)  # --cpus-per-task=1

    tiny_run.assert_same_losses(tiny_run.read_metrics(out), reference_metrics, range(1, tiny_run.STEPS + 1),
                                "srun-launched run")
    assert tiny_run.latest_tag(out) == f"step_{tiny_run.STEPS:08d}"
    assert f"step_{tiny_run.STEPS:08d}" in tiny_run.checkpoint_tags(out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["run"]["name"] == "tiny run, with spaces"
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"  # the default: beside run.output_dir
    runs = finished_runs(uri)
    assert len(runs) == 1, f"expected one finished MLflow run at {uri}, got {runs}"
    assert runs[0].data.tags.get("world_size") == "2"
    assert runs[0].info.run_name == "tiny run, with spaces"
    assert metric_steps(uri, runs[0].info.run_id) == list(range(1, tiny_run.STEPS + 1))


def test_without_the_checkouts_venv_the_job_stops_at_once_saying_make_setup(slurm, run_dir):
    root = make_checkout(run_dir, with_venv=False)
    cp = run(documented_sbatch_cmd(run_dir / "run"), timeout=30, env=job_env(slurm), cwd=root)
    job_id = cp.stdout.strip().split(";")[0]
    output = root / f"slurm-hvpmtl-pretrain-{job_id}.out"
    info = slurm.wait_job(job_id, TERMINAL_STATES, timeout=120, logs=[output])
    text = output.read_text()
    assert (info["JobState"], info.get("ExitCode")) == ("FAILED", "2:0"), f"{info}\n{text}"
    assert f"no python at {root}/.venv/bin/python: run `make setup` in {root}" in text, text
    assert "training exited" not in text, text


def test_ds_launcher_sbatch_runs_ranks_through_deepspeed_launcher_slurm(slurm, run_dir, reference_metrics):
    out = run_dir / "run"
    env = tiny_run.slurm_job_env(slurm.conf, out)
    env["EXTRA_ARGS"] += " --set 'run.name=ds launcher run'"  # EXTRA_ARGS is split by shell quoting rules
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
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["name"] == "ds launcher run"


def test_finetune_sbatch_config_error_fails_the_job_with_code_2_and_no_requeue(slurm, run_dir):
    # no model.init and no data dirs: launchers/finetune.py refuses the config on every rank
    job_id = slurm.sbatch([*ONE_NODE, "--time=5", f"--output={run_dir}/slurm-%j.out",
                           str(REPO / "launchers/slurm/finetune.sbatch"), "--config", "configs/finetune_tiny.yaml",
                           "--set", f"run.output_dir={run_dir / 'run'}"], env=launch_env(SLURM_CONF=str(slurm.conf)),
                          cwd=REPO)
    output = run_dir / f"slurm-{job_id}.out"
    info = slurm.wait_job(job_id, TERMINAL_STATES, timeout=300, logs=[output])
    text = output.read_text()
    assert (info["JobState"], info.get("ExitCode"), info.get("Restarts")) == ("FAILED", "2:0", "0"), (
        f"{info}\n{log_tail(output, 40)}")
    assert "config error" in text and "model.init" in text, log_tail(output, 40)
    assert "training exited with code 2" in text and "requeueing" not in text, log_tail(output, 40)


def test_outside_a_job_the_script_says_how_to_submit_it():
    cp = run(["bash", str(REPO / "launchers/slurm/pretrain.sbatch")], timeout=30, env=launch_env(), check=False)
    assert cp.returncode == 2, cp
    assert "usage: sbatch [sbatch options]" in cp.stderr, cp.stderr
