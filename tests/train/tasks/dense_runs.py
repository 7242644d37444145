"""Helpers of the detection and segmentation fine-tuning tests: --set arguments, a preempted-then-resumed run,
the last evaluation row."""
import json
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def preempt_then_resume(cmd: list[str], out: Path, cwd: Path, env: dict) -> str:
    """SIGTERM once the first step is logged (the run checkpoints and exits 3), then the same command again
    (--resume auto); returns the resumed run's log."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 3 and "preempted at step" in log, log[-3000:]
    done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "resumed from" in done.stdout
    return done.stdout


def final_eval(out: Path, key: str) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r][-1]

