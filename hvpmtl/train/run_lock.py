"""An exclusive lock on a run's output directory, safe on NFS and Lustre.

One training job writes a `run.output_dir` at a time: a second job that finds the lock held
stops at once, naming the host and pid of the holder. What it relies on:

- **O_EXCL create** of `<dir>/.hvpmtl.lock` is atomic on local file systems, NFSv3+ and Lustre
  (not on NFSv2). The file holds JSON: host, pid, the pid's start time, Slurm job id, a nonce.
  No fcntl/flock: those are unreliable or disabled on many NFS mounts.
- **A heartbeat**: the holder's daemon thread touches the file's mtime every `heartbeat_s`
  (10 s). On NFS the server stamps the time, so all clients compare against one clock.
- **Stale-lock takeover** (a job killed with -9, a lost node, a requeue):
  - holder on this host: stale as soon as its pid is gone (or the pid was reused: the process
    start time differs); a job cannot take over a live process's lock, whatever its age;
  - holder on another host: stale when the mtime is older than `stale_after_s` (90 s) *and* it
    does not move while we watch it for two heartbeats (so a clock skew between this node and
    the file server cannot steal a live lock). A Slurm requeue waits 121 s by default, so a
    requeued job takes the lock of its killed predecessor without waiting further.
  - takeovers are serialised by a second O_EXCL file, `.hvpmtl.lock.takeover`, and the lock is
    removed only if it still holds the nonce that was judged stale.
- The holder checks on every heartbeat that the file still holds its nonce; if another job took
  it over (this one was frozen past `stale_after_s`), `lost` says by whom, and the checkpoint
  writer refuses to write.
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = ".hvpmtl.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 90.0


class LockError(RuntimeError):
    """The output directory is locked by a live job (the message names it)."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid, it
    names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return start is None or _start_time(pid) in (None, start)


def _describe(h: dict) -> str:
    job = f", Slurm job {h['job']}" if h.get("job") else ""
    return f"{h.get('host', '?')} pid {h.get('pid', '?')}{job}, since {h.get('since', '?')}"


class RunLock:
    def __init__(self, directory: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
                 log=print):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.takeover_path = self.dir / (LOCK_NAME + ".takeover")
        self.heartbeat_s, self.stale_after_s, self.log = heartbeat_s, stale_after_s, log
        self.host = socket.gethostname()
        self.nonce = secrets.token_hex(8)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ acquiring
    def acquire(self) -> "RunLock":
        """Take the lock or raise LockError naming the live holder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="hvpmtl-run-lock", daemon=True)
                self._thread.start()
                atexit.register(self.release)
                return self
            holder, mtime = self._read()
            if holder is None and mtime is None:
                continue  # released meanwhile
            why = self._stale_reason(holder, mtime)
            self._take_over(holder, why)
        raise LockError(f"{self.path}: could not take the lock (it keeps changing hands); is another job starting?")

    def _create(self) -> bool:
        me = {"host": self.host, "pid": os.getpid(), "start": _start_time(os.getpid()), "nonce": self.nonce,
              "job": os.environ.get("SLURM_JOB_ID", ""), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[dict | None, float | None]:
        try:
            mtime = self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(text), mtime
        except ValueError:
            return {}, mtime  # being written, or damaged: judged by its age

    def _stale_reason(self, holder: dict, mtime: float) -> str:
        """Why the lock may be taken over; raises LockError when its holder is alive."""
        age = time.time() - mtime
        if holder.get("host") == self.host and holder.get("pid"):
            pid = int(holder["pid"])
            if pid == os.getpid():
                return "held by this very process"
            if _alive(pid, holder.get("start")):
                raise LockError(f"{self.dir} is in use by another job: {_describe(holder)} (lock file {self.path}). "
                                "Wait for it to finish or stop it; two jobs must not write one run.output_dir")
            return f"its holder ({_describe(holder)}) is gone"
        if age < self.stale_after_s:
            raise LockError(f"{self.dir} is in use by another job: {_describe(holder)} (lock file {self.path}, "
                            f"heartbeat {age:.0f} s ago). If that job is dead, the lock is taken over once its "
                            f"heartbeat is {self.stale_after_s:.0f} s old; or delete {self.path} yourself")
        # old by our clock: make sure it does not move (clock skew between this node and the file server)
        time.sleep(min(2 * self.heartbeat_s, self.stale_after_s / 3))
        holder2, mtime2 = self._read()
        if mtime2 is not None and (mtime2 != mtime or holder2.get("nonce") != holder.get("nonce")):
            raise LockError(f"{self.dir} is in use by another job: {_describe(holder2)} (lock file {self.path}; "
                            "its heartbeat moves)")
        return f"its heartbeat stopped {age:.0f} s ago ({_describe(holder)})"

    def _take_over(self, holder: dict, why: str) -> None:
        try:
            fd = os.open(self.takeover_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a takeover that died half-way
                if time.time() - self.takeover_path.stat().st_mtime > self.stale_after_s:
                    self.takeover_path.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.2)
            return
        os.close(fd)
        try:
            now, _ = self._read()
            if now is not None and now.get("nonce") == holder.get("nonce"):
                self.path.unlink()
                self.log(f"took over the lock of {self.dir}: {why}")
        finally:
            self.takeover_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ holding
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder, _ = self._read()
            if holder is None or holder.get("nonce") != self.nonce:
                self.lost = (f"the lock {self.path} was taken over by {_describe(holder)}" if holder
                             else f"the lock {self.path} was removed")
                self.log(f"WARNING: {self.lost}; this job will not write checkpoints any more")
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a transient file-system error: the next beat retries

    def release(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        holder, _ = self._read()
        if holder is not None and holder.get("nonce") == self.nonce:
            self.path.unlink(missing_ok=True)
        self._thread = None
