"""An exclusive lock on a run's output directory, safe on NFS and Lustre.

One training job writes a `run.output_dir` at a time: a second job that finds the lock held
stops at once, naming the host and pid of the holder. What it relies on:

- **Exclusive create** of `<dir>/.hvpmtl.lock` (hvpmtl.fileio.create_exclusive) is atomic on local file
  systems, NFSv3+ and Lustre (not on NFSv2). The file holds JSON: host, pid, the pid's start time,
  Slurm job id, a nonce.
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
  - takeovers are serialised by a second exclusive file, `.hvpmtl.lock.takeover`, and the lock is
    removed only if it still holds what was judged stale.
- The holder record, its atomic create, the liveness of a holder on this host and the takeover are
  hvpmtl/locks.py's, shared with the data index's build lock. What differs is when a holder of
  another host is judged: here at once, watching the mtime for two heartbeats once it is older than
  `stale_after_s` by our clock (a job must start or refuse in seconds), while the build lock, which
  waits for its builder anyway, watches across its polls.
- The holder checks on every heartbeat that the file still holds its nonce; if another job took
  it over (this one was frozen past `stale_after_s`), `lost` says by whom, and the checkpoint
  writer refuses to write. A lock removed by hand (no other holder) is created again at once.
"""
from __future__ import annotations

import atexit
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from hvpmtl.locks import (GARBAGE_GRACE_S, TAKEOVER_STALE_S, create_lock_file, describe_holder, holder_record,
                          parse_holder, process_alive, read_lock_file, take_over)

LOCK_NAME = ".hvpmtl.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 90.0


class LockError(RuntimeError):
    """The output directory is locked by a live job (the message names it)."""


class RunLock:
    def __init__(self, directory: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
                 log=print):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
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
            holder, mtime, content = self._read_raw()
            if holder is None and mtime is None:
                continue  # released meanwhile
            why = self._stale_reason(holder, mtime)
            self._take_over(content, why)
        raise LockError(f"{self.path}: could not take the lock (it keeps changing hands); is another job starting?")

    def _create(self) -> bool:
        return create_lock_file(self.path, holder_record(self.nonce, job=os.environ.get("SLURM_JOB_ID", "")))

    def _read(self) -> tuple[dict | None, float | None]:
        holder, mtime, _ = self._read_raw()
        return holder, mtime

    def _read_raw(self) -> tuple[dict | None, float | None, bytes | None]:
        content, mtime = read_lock_file(self.path)
        if content is None:
            return None, None, None
        return parse_holder(content) or {}, mtime, content  # {}: being written, or garbage

    def _stale_reason(self, holder: dict, mtime: float) -> str:
        """Why the lock may be taken over; raises LockError when its holder is alive."""
        age = time.time() - mtime
        if not holder:  # not a holder record (a pid that is no integer, a JSON list, garbage)
            if age < GARBAGE_GRACE_S:  # its creator writes the record at once
                raise LockError(f"{self.path} is being written by another job starting now; try again")
            self.log(f"WARNING: {self.path} holds no holder record: taken as stale")
            return "it holds no holder record"
        if holder.get("host") == self.host and holder.get("pid"):
            pid = int(holder["pid"])
            if pid == os.getpid():
                return "held by this very process"
            if process_alive(pid, holder.get("start")):
                raise LockError(f"{self.dir} is in use by another job: {describe_holder(holder)} "
                                f"(lock file {self.path}). Wait for it to finish or stop it; two jobs must not "
                                "write one run.output_dir")
            return f"its holder ({describe_holder(holder)}) is gone"
        if age < self.stale_after_s:
            beat = f"heartbeat {age:.0f} s ago" if age > -5 else \
                f"heartbeat {-age:.0f} s in the future: this host's clock is behind the file server's by about that"
            raise LockError(f"{self.dir} is in use by another job: {describe_holder(holder)} (lock file {self.path}, "
                            f"{beat}). If that job is dead, the lock is taken over once its "
                            f"heartbeat is {self.stale_after_s:.0f} s old; or delete {self.path} yourself")
        # old by our clock: make sure it does not move (clock skew between this node and the file server)
        time.sleep(min(2 * self.heartbeat_s, self.stale_after_s / 3))
        holder2, mtime2 = self._read()
        if mtime2 is not None and (mtime2 != mtime or holder2.get("nonce") != holder.get("nonce")):
            raise LockError(f"{self.dir} is in use by another job: {describe_holder(holder2)} (lock file {self.path}; "
                            f"its heartbeat moves, though its time looked {age:.0f} s old by this host's clock: this "
                            "host's clock and the file server's differ by about that much)")
        return f"its heartbeat stopped {age:.0f} s ago ({describe_holder(holder)})"

    def _take_over(self, judged: bytes, why: str) -> None:
        if take_over(self.path, judged, leftover_after_s=TAKEOVER_STALE_S):
            self.log(f"took over the lock of {self.dir}: {why}")
        else:
            time.sleep(0.2)  # another job is taking it over, or it changed: look again

    # ------------------------------------------------------------------ holding
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder, _ = self._read()
            if holder is None and self._create():  # removed (a person, a cleanup), and no other job has it
                self.log(f"WARNING: the lock {self.path} was removed while this job held it; it holds it again")
                continue
            if holder is None:
                holder, _ = self._read()
            if holder is None or holder.get("nonce") != self.nonce:
                self.lost = (f"the lock {self.path} was taken over by {describe_holder(holder)}" if holder
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
