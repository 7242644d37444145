"""The engine through the real `deepspeed` launcher: 1 rank vs 2 ranks, preemption + exact resume,
config errors, and MLflow against a real `mlflow server` on 127.0.0.1."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from subprocs import free_port, subprocess_env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

STEPS = 8


def _args(out, *more):
    return ["launchers/pretrain.py", "--config", "configs/test_tiny.yaml", "--set", f"run.output_dir={out}",
            "--set", f"optim.max_steps={STEPS}", "--set", "run.checkpoint_every=100", *more]


def _run(cmd, env, timeout=300):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
                             "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            env=subprocess_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not come up: {(d / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, mlflow_server):
    """The uninterrupted reference: 1 rank, micro batch 4, logged to the real MLflow server."""
    out = tmp_path_factory.mktemp("one") / "run"
    code, log = _run([sys.executable, *_args(out)], subprocess_env(MLFLOW_TRACKING_URI=mlflow_server))
    assert code == 0, log[-3000:]
    return out


def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, one_rank_run):
    out = tmp_path / "run"
    code, log = _run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1",
                      "--master_port", str(free_port()), *_args(out, "--set", "optim.micro_batch_size=2")],
                     subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db"))
    assert code == 0, log[-3000:]
    assert "2 rank(s)" in log
    one, two = _metrics(one_rank_run), _metrics(out)
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        for k in ("loss", "asl", "swav", "mim", "distill"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])


def test_preemption_checkpoints_and_resume_reproduces_the_next_steps(tmp_path, one_rank_run):
    out = tmp_path / "run"
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    proc = subprocess.Popen([sys.executable, *_args(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, log[-3000:]
    assert "preempted at step" in log
    stopped = len(_metrics(out))
    assert 3 <= stopped < STEPS, "preempted too late to test resume"
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()

    code, log = _run([sys.executable, *_args(out)], env)  # --resume auto is the default
    assert code == 0, log[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'}" in log
    resumed, ref = _metrics(out), _metrics(one_rank_run)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(ref[stopped:], resumed[stopped:]):
        for k in ("loss", "asl", "swav", "mim", "distill", "lr"):
            assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])

    # the resumed process continued the same MLflow run
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("hvpmtl").experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == list(range(1, STEPS + 1))


def test_run_is_readable_from_the_mlflow_server(one_rank_run, mlflow_server):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("hvpmtl")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0001" and run.data.params["model.backbone"] == "vit_tiny_patch16_224"
    for k in ("asl", "swav", "mim", "distill", "loss", "lr", "grad_norm", "img_per_s", "mem_gib"):
        hist = client.get_metric_history(run.info.run_id, k)
        assert len(hist) == STEPS, k
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "backbone"} <= arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {"config/config.yaml",
                                                                                  "config/ds_config.json"}


def test_config_error_names_the_key_before_any_worker_starts(tmp_path):
    code, log = _run([sys.executable, "launchers/pretrain.py", "--config", "configs/test_tiny.yaml",
                      "--set", "optim.lrr=1"], subprocess_env(), timeout=120)
    assert code == 2
    assert "unknown key 'optim.lrr'" in log and "configs/test_tiny.yaml" in log
