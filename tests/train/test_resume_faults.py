"""Faults around a run's saved state, through launchers/pretrain.py as a user runs it (1 rank): a damaged
checkpoint with nothing to fall back to, --resume none/fresh into a used folder, two jobs on one folder and a
requeue after kill -9, and files that would run code. Each case exits with a documented code and trains
nothing it should not (issue 10, cases 2, 3, 4 and 6)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import hashlib

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    return env


def _cmd(out, steps, *more):
    return [sys.executable, str(ROOT / "launchers/pretrain.py"), "--config", str(ROOT / "configs/test_tiny.yaml"),
            "--set", f"run.output_dir={out}", "--set", f"optim.max_steps={steps}", "--set", "run.checkpoint_every=2",
            "--set", "tracking.enabled=false", "--set", f"run.ds_config={ROOT / 'ds_configs/zero2.json'}", *more]


def _run(out, steps, *more, timeout=400):
    p = subprocess.run(_cmd(out, steps, *more), cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _steps(out):
    f = Path(out) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in f.read_text().splitlines()] if f.exists() else []


EXIT_CHECKPOINT = 6  # documented in docs/CLUSTER.md


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def reseal(tag: Path) -> None:
    """Rewrite the manifest to match the files as they are (what someone who 'repairs' a checkpoint does)."""
    m = json.loads((tag / "COMPLETE").read_text())
    for name, e in m["files"].items():
        e.update(size=(tag / name).stat().st_size, sha256=hashlib.sha256((tag / name).read_bytes()).hexdigest())
    (tag / "COMPLETE").unlink()
    (tag / "COMPLETE").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A 6-step run with checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("faults") / "run"
    code, log = _run(out, 6)
    assert code == 0, log[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [tag_for(s) for s in (2, 4, 6)]
    return out


@pytest.fixture
def copy(written, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(written, out)
    return out


def test_damaged_only_checkpoint_stops_with_exit_6_and_trains_nothing(copy):
    """Case 2: same-size corruption of rank_0.pt, nothing older to use (keep_checkpoints=1)."""
    for s in (2, 4):
        shutil.rmtree(copy / "checkpoints" / tag_for(s))
    f = copy / "checkpoints" / tag_for(6) / "rank_0.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    before = _steps(copy)
    code, log = _run(copy, 9, "--set", "run.keep_checkpoints=1")
    assert code == EXIT_CHECKPOINT, log[-3000:]
    assert "checkpoint error" in log and "rank_0.pt does not match its checksum" in log
    assert "step 7" not in log and _steps(copy) == before  # nothing trained, nothing logged
    assert sorted(p.name for p in (copy / "checkpoints").glob("step_*")) == [tag_for(6)]  # nothing pruned
    assert (copy / "checkpoints" / "latest").read_text() == tag_for(6)


def test_resume_none_refuses_and_fresh_starts_a_new_run_that_auto_then_continues(copy):
    """Case 3: a used output_dir is never silently mixed with a new run."""
    code, log = _run(copy, 4, "--resume", "none")
    assert code == EXIT_CHECKPOINT and "--resume none, but" in log and "--resume fresh" in log, log[-3000:]
    old_run = json.loads((copy / "checkpoints" / tag_for(6) / "COMPLETE").read_text())["run_id"]
    code, log = _run(copy, 2, "--resume", "fresh")
    assert code == 0, log[-3000:]
    assert "from step 0" in log and "moved to" in log
    new = json.loads((copy / "checkpoints" / tag_for(2) / "COMPLETE").read_text())["run_id"]
    assert new != old_run
    assert sorted(p.name for p in (copy / "checkpoints").glob("step_*")) == [tag_for(2)]
    old = [p for p in (copy / "superseded").iterdir()]
    assert len(old) == 1 and old[0].name.startswith(old_run)
    assert _steps(old[0]) == [1, 2, 3, 4, 5, 6] and _steps(copy) == [1, 2]  # metrics not interleaved
    code, log = _run(copy, 4)  # --resume auto: the new run, not the old one's step 6
    assert code == 0, log[-3000:]
    assert f"resumed from {copy / 'checkpoints' / tag_for(2)}" in log and _steps(copy) == [1, 2, 3, 4]


def test_a_second_job_on_the_folder_refuses_and_a_restart_after_kill_9_takes_over(tmp_path):
    """Case 4: the lock names the live holder; a killed holder's lock is taken over by the requeued job."""
    out = tmp_path / "run"
    first = subprocess.Popen(_cmd(out, 400), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(_steps(out)) < 3:  # training, with a checkpoint at step 2
            assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.2)
        code, log = _run(out, 400, timeout=120)
        assert code == EXIT_CHECKPOINT, log[-3000:]
        assert f"is in use by another job: {socket.gethostname()} pid {first.pid}" in log
        assert "step 1/" not in log and first.poll() is None
        lock = json.loads((out / ".hvpmtl.lock").read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    assert (out / ".hvpmtl.lock").exists()  # kill -9 leaves it behind
    last = (out / "checkpoints" / "latest").read_text().strip()
    code, log = _run(out, int(last[len("step_"):]) + 1)
    assert code == 0, log[-3000:]
    assert f"took over the lock of {out}: its holder ({socket.gethostname()} pid {first.pid}" in log
    assert f"resumed from {out / 'checkpoints' / last}" in log
    assert not (out / ".hvpmtl.lock").exists()  # released at the end


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    obj = torch.load(path, weights_only=False)  # our own file, just written by the test's run
    obj["innocent"] = Payload(marker)
    torch.save(obj, path)


def test_payloads_in_checkpoint_files_never_run(copy, tmp_path):
    """Case 6: a pickle that would run code, in the newest checkpoint only (the older one is used) and then
    in every checkpoint with the manifests rewritten to match (exit 6)."""
    marker = tmp_path / "pwned"
    newest = copy / "checkpoints" / tag_for(6)
    _plant(newest / "mp_rank_00_model_states.pt", marker)
    code, log = _run(copy, 6)
    assert code == 0, log[-3000:]
    assert f"resumed from {copy / 'checkpoints' / tag_for(4)}" in log
    assert "mp_rank_00_model_states.pt" in log and not marker.exists()
    for s in (2, 4, 6):
        tag = copy / "checkpoints" / tag_for(s)
        _plant(tag / "rank_0.pt", marker)
        reseal(tag)
    code, log = _run(copy, 8)
    assert code == EXIT_CHECKPOINT, log[-3000:]
    assert "refused to load: it is not a plain weights file" in log and not marker.exists()
