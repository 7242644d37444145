"""MLflow tracking off the critical path, against real stores: sqlite files and a real `mlflow server` on
127.0.0.1 that the tests stop and start again (an outage), never a mock."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hvpmtl.cli import main as cli_main
from hvpmtl.config import ConfigError, load_config
from hvpmtl.train.tracking.check import EXPERIMENT_KIND, TrackingUnreachable, check_tracking
from hvpmtl.train.tracking.state import STATE_FILE
from hvpmtl.train.tracking.tracker import Tracker

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.cluster.mlflow_runs import MlflowServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent


def _cfg(out, uri, *more):
    return load_config(ROOT / "configs/test_tiny.yaml", [f"run.output_dir={out}", f"tracking.tracking_uri={uri}",
                                                         *more])


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _steps(uri, run_id, key="loss"):
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _env():
    """For a launched run: not the rendezvous of this process's own (in-process test) process group."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PATH=f"{BIN}:{env.get('PATH', '')}")
    return env


def _wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ----------------------------------------------------------------------------- sqlite: what reaches MLflow


def test_every_row_reaches_mlflow_with_its_time_and_the_experiment_is_a_training_one(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    t = Tracker(_cfg(tmp_path / "run", uri), active=True)
    for s in range(1, 31):
        t.log_metrics({"loss": 1.0 / s, "lr": 1e-4, "epoch": 0}, s)
    t.set_tags({"world_size": 2})
    t.close()
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 31))
    client = MlflowClient(uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.params["optim.lr"] == "0.0001"
    hist = sorted(client.get_metric_history(t.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(1, 31))
    assert [m.value for m in hist] == [r["loss"] for r in rows]
    assert [m.timestamp for m in hist] == [int(r["time"] * 1000) for r in rows]  # when logged, not when sent
    assert "time" not in run.data.metrics
    # MLflow 3.x opens an experiment with this tag on its runs, not on the GenAI overview
    exp = client.get_experiment_by_name("hvpmtl")
    assert exp.tags["mlflow.experimentKind"] == EXPERIMENT_KIND["mlflow.experimentKind"]
    state = json.loads((tmp_path / "run" / STATE_FILE).read_text())
    assert state["run_id"] == t.run_id and state["tracking_uri"] == uri and state["status"] == "FINISHED"
    assert state["synced_bytes"] == (tmp_path / "run" / "metrics.jsonl").stat().st_size
    assert "workflowType=machine_learning" in state["ui"]


def test_an_existing_experiment_gets_the_training_kind_unless_the_user_chose_one(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    plain = client.create_experiment("plain")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    check_tracking(_cfg(tmp_path / "a", uri, "tracking.experiment=plain"))
    check_tracking(_cfg(tmp_path / "b", uri, "tracking.experiment=chosen"))
    assert client.get_experiment(plain).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_resuming_into_another_tracking_store_says_where_the_run_was_and_links_a_new_run(tmp_path, capfd):
    first, second = f"sqlite:///{tmp_path}/first.db", f"sqlite:///{tmp_path}/second.db"
    out = tmp_path / "run"
    t = Tracker(_cfg(out, first), active=True)
    t.log_metrics({"loss": 1.0}, 1)
    t.close()
    old = t.run_id
    capfd.readouterr()
    # the checkpoint carries `old`; the job is resumed with a different tracking URI
    t2 = Tracker(_cfg(out, second), active=True, run_id=old)
    t2.log_metrics({"loss": 0.5}, 2)
    t2.close()
    err = capfd.readouterr().err
    assert f"MLflow run {old} does not exist at {second}" in err
    assert f"it was logged to {first}" in err and f"tracking.tracking_uri={first}" in err
    assert t2.run_id != old
    run = MlflowClient(second).get_run(t2.run_id)
    assert run.data.tags["hvpmtl.resumed_from_run_id"] == old
    assert run.data.tags["hvpmtl.resumed_from_tracking_uri"] == first
    assert _steps(second, t2.run_id) == [2]  # the rows of the old run stay with the old run
    assert _steps(first, old) == [1]


def test_resuming_the_same_run_sends_what_the_last_process_could_not(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    out = tmp_path / "run"
    t = Tracker(_cfg(out, uri), active=True)
    t.log_metrics({"loss": 1.0}, 1)
    t.close()
    # the process dies (kill -9) after writing rows it never sent: metrics.jsonl has them, MLflow does not
    with open(out / "metrics.jsonl", "a") as f:
        for s in (2, 3):
            f.write(json.dumps({"step": s, "loss": 1.0 / s, "time": time.time()}) + "\n")
    t2 = Tracker(_cfg(out, uri), active=True, run_id=t.run_id)
    t2.log_metrics({"loss": 0.25}, 4)
    t2.close()
    assert t2.run_id == t.run_id
    assert _steps(uri, t.run_id) == [1, 2, 3, 4]


def test_tracking_options_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="tracking.on_unreachable"):
        _cfg(tmp_path, "sqlite:///x.db", "tracking.on_unreachable=retry")
    with pytest.raises(ConfigError, match="tracking.close_timeout_s"):
        _cfg(tmp_path, "sqlite:///x.db", "tracking.close_timeout_s=0")
    # a typo in the scheme is refused at load, even when an unreachable server would be waited for
    with pytest.raises(ConfigError, match=r"tracking.tracking_uri: 'htp://' is not a tracking store MLflow knows"):
        _cfg(tmp_path, "htp://127.0.0.1:5000", "tracking.on_unreachable=continue")
    for ok in ("http://127.0.0.1:5000", "postgresql+psycopg2://u@127.0.0.1/db", "file:///tmp/mlruns", "mlruns"):
        _cfg(tmp_path, ok)


@pytest.mark.slow
def test_a_mistyped_tracking_uri_exits_2_before_the_model_is_built(tmp_path):
    for where in ("set", "env"):
        env = _env()
        sets = ["--set", "tracking.on_unreachable=continue", "--set", f"run.output_dir={tmp_path / where}"]
        if where == "set":
            sets += ["--set", "tracking.tracking_uri=htp://127.0.0.1:5000"]
        else:
            env["MLFLOW_TRACKING_URI"] = "htp://127.0.0.1:5000"
        p = subprocess.run([sys.executable, "launchers/pretrain.py", "--config", "configs/test_tiny.yaml", *sets],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        log = p.stdout + p.stderr
        assert p.returncode == 2 and "'htp://' is not a tracking store" in log, log[-3000:]
        assert "Traceback" not in log and "rank(s)" not in log


# ----------------------------------------------------------------------------- a real server, unreachable


def test_unreachable_at_start_fails_fast_when_told_to(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TrackingUnreachable, match=r"cannot reach MLflow at http://127.0.0.1:\d+.*on_unreachable"):
        check_tracking(_cfg(tmp_path, uri, "tracking.on_unreachable=fail"))


@pytest.mark.slow
def test_unreachable_at_start_exits_2_before_the_model_is_built(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    p = subprocess.run([sys.executable, "launchers/pretrain.py", "--config", "configs/test_tiny.yaml",
                        "--set", f"run.output_dir={tmp_path / 'run'}", "--set", f"tracking.tracking_uri={uri}",
                        "--set", "tracking.on_unreachable=fail"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=_env())
    log = p.stdout + p.stderr
    assert p.returncode == 2, log[-3000:]
    assert f"cannot reach MLflow at {uri}" in log
    assert "Traceback" not in log
    # stopped before the model and DeepSpeed: no engine, no checkpoint folder, no config written
    assert "DeepSpeed info" not in log and "rank(s)" not in log
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_server_down_then_up_run_created_late_outage_survived_close_bounded_and_sync(tmp_path, capfd):
    """on_unreachable=continue: no server at start -> rows kept; the server comes up -> the run is created and
    caught up; the server goes down -> logging goes on, one warning; close() gives up after close_timeout_s and
    names the missing steps; the server is back -> `sync` sends them and closes the run."""
    server = MlflowServer(tmp_path / "server")
    out = tmp_path / "run"
    cfg = _cfg(out, server.url, "tracking.close_timeout_s=3", "tracking.request_timeout_s=2",
               "tracking.request_retries=0", "tracking.check_timeout_s=3")
    t = Tracker(cfg, active=True)
    assert t.run_id is None
    for s in (1, 2, 3):
        t.log_metrics({"loss": 1.0 / s}, s)
    server.start()
    try:
        assert t.flush(120), "the run was not created and caught up once the server came up"
        assert t.run_id is not None and _steps(server.url, t.run_id) == [1, 2, 3]
        server.stop()
        for s in range(4, 10):
            t.log_metrics({"loss": 1.0 / s}, s)  # returns at once, server or not
        t.close("FINISHED")
        err = capfd.readouterr().err
        assert err.count("is not answering") == 1 and "is unreachable" in err  # start-up, then one outage
        assert "answering again" in err  # the first outage (at start) ended
        assert "Missing from the MLflow run" in err and "steps 4..9" in err
        assert f"hvpmtl tracking sync {out}" in err
        assert [r["step"] for r in _rows(out)] == list(range(1, 10))
        server.start()
        assert cli_main(["tracking", "sync", str(out), "--timeout", "120"]) == 0  # the command the message gives
        client = MlflowClient(server.url)
        assert _steps(server.url, t.run_id) == list(range(1, 10))
        run = client.get_run(t.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["optim.lr"] == "0.0001"
        assert "outage" in run.data.tags["hvpmtl.tracking_outages"]
    finally:
        server.stop()


@pytest.mark.slow
def test_training_outlives_a_server_outage_mid_run_and_mlflow_catches_up(tmp_path):
    """Issue 10.5: the MLflow server is stopped at step 3 and started again; the run goes on, finishes with
    exit 0 and a checkpoint, metrics.jsonl has every step, and MLflow has them all after the restart."""
    steps = 40  # enough that steps remain for the outage on a fast machine
    server = MlflowServer(tmp_path / "server").start()
    out = tmp_path / "run"
    log_path = tmp_path / "train.log"
    env = _env()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "launchers/pretrain.py", "--config", "configs/test_tiny.yaml",
                                 "--set", f"run.output_dir={out}", "--set", f"optim.max_steps={steps}",
                                 "--set", "optim.epochs=100", "--set", "run.checkpoint_every=1000",
                                 "--set", f"tracking.tracking_uri={server.url}",
                                 "--set", "tracking.request_timeout_s=10", "--set", "tracking.request_retries=0",
                                 "--set", "tracking.check_timeout_s=60",
                                 "--set", "tracking.close_timeout_s=180"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        metrics = out / "metrics.jsonl"
        n_rows = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
        _wait_for(lambda: n_rows() >= 3 or proc.poll() is not None, 300, "step 3")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        server.stop(abrupt=True)  # a graceful stop took long enough on a fast machine for the run to finish
        at_stop = n_rows()
        # training goes on while nothing answers
        _wait_for(lambda: n_rows() >= at_stop + 3 or proc.poll() is not None, 300, "steps during the outage")
        assert n_rows() >= at_stop + 3, log_path.read_text()[-3000:]
        server.start()
        proc.wait(400)
    finally:
        if proc.poll() is None:
            proc.kill()
        log = log_path.read_text()
    try:
        assert proc.returncode == 0, log[-3000:]
        assert (out / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").is_file()
        assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(1, steps + 1))
        # each outage (one here, more when a loaded machine times a request out) is said once, and its end too
        outages = log.count("is not answering") + log.count("is unreachable")
        assert 1 <= outages == log.count("answering again"), log[-3000:]
        client = MlflowClient(server.url)
        run = client.search_runs([client.get_experiment_by_name("hvpmtl").experiment_id])[0]
        assert run.info.status == "FINISHED"
        for key in ("loss", "lr", "img_per_s"):
            assert _steps(server.url, run.info.run_id, key) == list(range(1, steps + 1)), key
        assert run.data.tags["hvpmtl.tracking_outages"].startswith(f"{outages} outage(s)")
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config", "backbone"}
    finally:
        server.stop()


# ----------------------------------------------------------------------------- image panels at the last step


def test_image_panels_are_logged_at_the_final_step_too(tmp_path, monkeypatch):
    from hvpmtl.train.pretrain import Pretrainer
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by the in-process group:
        monkeypatch.setenv(k, "")  # recorded by monkeypatch, so they are gone again after the test and the runs
        monkeypatch.delenv(k)  # launched by later tests pick their own rendezvous
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = _cfg(tmp_path / "run", uri, "optim.max_steps=3", "run.image_log_every=2", "run.checkpoint_every=1000",
               "objectives.asl.enabled=false", "objectives.swav.enabled=false", "objectives.distill.enabled=false")
    from hvpmtl.eval.hooks import pretrain_hooks
    t = Pretrainer(cfg, resume="none", hooks=pretrain_hooks())
    assert t.run() == 0
    names = {a.path for a in MlflowClient(uri).list_artifacts(t.tracker.run_id, "panels")}
    assert names == {"panels/mim_step_000002.png", "panels/losses_step_000002.png",
                     "panels/mim_step_000003.png", "panels/losses_step_000003.png"}

