"""Process helpers for the cluster tests: free ports, bounded waits, log tails, clean kills.

Every wait here has a deadline and every failure carries the tail of the logs that explain it,
so a daemon or a job that goes wrong fails the test with its own words instead of hanging it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from subprocs import free_port  # noqa: F401  (tests/ is on sys.path; the cluster tests' ports come from here)


def log_tail(path: str | Path, lines: int = 40) -> str:
    p = Path(path)
    if not p.exists():
        return f"--- {p}: (no file)"
    text = p.read_text(errors="replace").splitlines()
    return f"--- {p} (last {min(lines, len(text))} of {len(text)} lines)\n" + "\n".join(text[-lines:])


def logs_tail(paths: Iterable[str | Path], lines: int = 40) -> str:
    return "\n".join(log_tail(p, lines) for p in paths)


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               logs: Iterable[str | Path] = (), interval: float = 0.2):
    """Poll `predicate` until it returns something truthy; fail with `what` and the logs' tails."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs_tail(logs)}")
        time.sleep(interval)


def run(cmd: list[str], timeout: float = 60, env: Optional[dict] = None, check: bool = True,
        cwd: Optional[str | Path] = None) -> subprocess.CompletedProcess:
    """subprocess.run with a deadline; a failure shows the command, exit code and output."""
    try:
        cp = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"`{' '.join(cmd)}` did not finish in {timeout}s\n"
                             f"stdout: {e.stdout}\nstderr: {e.stderr}") from None
    if check and cp.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` exited {cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}")
    return cp


class Daemon:
    """A foreground daemon we started; its stdout+stderr go to `log`. Stopped by its own pid."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: Optional[dict] = None):
        self.name, self.cmd, self.log = name, cmd, log
        self._log_file = open(log, "ab")
        # Own session: a stray signal to the test's process group does not reach it, and
        # stop() can take down anything it forked.
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self):
        """Fail with the daemon's log if it has exited (used inside wait_until's predicates)."""
        if not self.alive():
            raise AssertionError(f"{self.name} exited with code {self.proc.returncode}: `{' '.join(self.cmd)}`\n"
                                 f"{log_tail(self.log)}")

    def stop(self, grace: float = 10.0):
        if self.alive():
            kill_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                kill_group(self.proc, signal.SIGKILL)
                self.proc.wait(5)
        self._log_file.close()


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL):
    """Signal the process group of a process started with start_new_session=True."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: split after the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    todo, out = [pid], []
    while todo:
        kids = child_pids(todo.pop())
        out += kids
        todo += kids
    return out


def run_logged(cmd: list[str], log: Path, timeout: float, env: Optional[dict] = None,
               cwd: Optional[str | Path] = None, on_timeout: Callable[[], None] = lambda: None) -> int:
    """Run a launcher to completion with its output in `log`; past `timeout` kill its process group
    (and whatever `on_timeout` cleans up, e.g. remote ranks) and fail with the log's tail."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc, signal.SIGKILL)
            on_timeout()
            proc.wait(10)
            raise AssertionError(f"`{' '.join(cmd)}` did not finish in {timeout:.0f}s\n{log_tail(log, 60)}") from None
        finally:
            if proc.poll() is None:  # an exception (e.g. KeyboardInterrupt) while waiting
                kill_group(proc, signal.SIGKILL)
