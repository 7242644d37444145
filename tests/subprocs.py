"""The environment and runner for processes a test starts (tests/ is on sys.path through tests/conftest.py)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def subprocess_env(**extra) -> dict:
    """The environment of a process a test starts."""
    # not the rendezvous of this process's own (in-process test) process group
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # TRITON_INTERPRET=0: a launched run takes the losses' torch path on the CPU, as a user's CPU run does (the
    # kernels are checked in tests/kernels and, in the loop, by the in-process engine tests); the interpreter
    # doubled every launched training process's time
    e.update({"DS_ACCELERATOR": "cpu", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1",
              "TRITON_INTERPRET": "0", "PATH": f"{BIN}:{e.get('PATH', '')}"})
    e.update(extra)
    return e


def run_cmd(cmd, cwd, timeout=400, **extra):
    p = subprocess.run(cmd, cwd=cwd, env=subprocess_env(**extra), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
