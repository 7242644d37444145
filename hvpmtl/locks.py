"""The lock-file primitive of hvpmtl: the holder record, its atomic create, its liveness and the takeover (the
run lock, hvpmtl/checkpoint/run_lock.py), and HeartbeatLock built on them (the data index's build lock, a
shard's download). A holder is a (pid, start time) pair, so a reused pid never keeps a dead holder's lock."""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from hvpmtl.fileio import create_exclusive


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid, it
    names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def process_alive(pid: int, start: str | None) -> bool:
    """Whether the process `pid` that started at `start` (None: any) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return start is None or process_start_time(pid) in (None, start)


# ----------------------------------------------------------------------------- the lock file
# A lock file is created exclusively (fileio.create_exclusive: atomic on local file systems, NFSv3+ and Lustre; no flock, which
# many NFS mounts lack) and holds one JSON holder record. Its holder touches its mtime (the heartbeat: on NFS
# the file server stamps it, so hosts never compare clocks). The stale rule: a holder on this host is dead
# as soon as its process is gone (process_alive); a holder on another host, or a file that holds no record,
# is dead once the file has not changed while watched for the lock's stale time. A takeover is serialised by
# a second lock file (`<lock>.takeover`) and removes the lock only if it still holds exactly what was judged dead.


def holder_record(nonce: str, **extra) -> dict:
    """This process as a lock holder: host, pid, the pid's start time, a nonce (which acquisition), since."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start_time(os.getpid()),
            "nonce": nonce, **extra, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def create_lock_file(path: str | os.PathLike, record: dict) -> bool:
    """Create `path` holding `record` if it does not exist; False when it does (held). Other OSErrors (a
    read-only folder) propagate."""
    return create_exclusive(path, json.dumps(record))


def read_lock_file(path: str | os.PathLike) -> tuple[Optional[bytes], Optional[float]]:
    """(content, mtime) of a lock file, (None, None) when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None, None


def parse_holder(content: Optional[bytes]) -> Optional[dict]:
    """The holder record in a lock file's bytes, or None for anything else (garbage, a list, a bad pid)."""
    try:
        h = json.loads(content or b"")
    except (ValueError, RecursionError):
        return None
    pid = h.get("pid") if isinstance(h, dict) else None
    if not isinstance(h.get("host") if isinstance(h, dict) else None, str) or not (
            isinstance(pid, int) and not isinstance(pid, bool) and 1 <= pid < 2**31):
        return None
    return h


def describe_holder(h: dict) -> str:
    job = f", Slurm job {h['job']}" if h.get("job") else ""
    return f"{h.get('host', '?')} pid {h.get('pid', '?')}{job}, since {h.get('since', '?')}"


def local_holder_gone(h: dict) -> Optional[bool]:
    """For a holder record on this host: whether its process is gone; None for a holder on another host
    (judged by its heartbeat instead)."""
    if h.get("host") != socket.gethostname():
        return None
    return not process_alive(int(h["pid"]), h.get("start"))


def take_over(path: str | os.PathLike, judged: Optional[bytes], leftover_after_s: float) -> bool:
    """Remove the lock `path` if it still holds `judged` (the content found dead), serialised with other
    takers by `<path>.takeover`; a takeover file older than leftover_after_s (a taker that died) is removed.
    True when the lock was removed here."""
    path = Path(path)
    guard = path.with_name(path.name + ".takeover")
    if not create_lock_file(guard, holder_record("takeover")):
        content, mtime = read_lock_file(guard)
        if content is None:
            return False
        taker = parse_holder(content)
        if (taker is not None and local_holder_gone(taker)) or time.time() - mtime > leftover_after_s:
            guard.unlink(missing_ok=True)  # a taker that died (on this host: at once)
        return False
    try:
        if read_lock_file(path)[0] == judged:
            path.unlink(missing_ok=True)
            return True
        return False
    finally:
        guard.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- a lock held while working

HEARTBEAT_S = 5.0  # the holder touches its lock this often
STALE_S = 60.0  # a lock of another host whose mtime has not moved for this long (watched here) is dead
GARBAGE_GRACE_S = 5.0  # a lock whose content is not a holder record is dead once this old (its creator writes at once)
TAKEOVER_STALE_S = 10.0  # a takeover takes milliseconds: a leftover `.takeover` file this old is removed


class HeartbeatLock:
    """A lock held while work is done (the data index's build, a shard's download), by the one stale rule:
    the holder record above, touched every `heartbeat_s` while held. A lock is
    dead, and taken over at once, when its holder is on this host and its process is gone (pid
    reuse: the start time differs), or when its content is not a holder record (a warning says so);
    a lock of another host is dead when its mtime stays still for `stale_s` while we watch (the
    file server stamps mtime, so no clock is compared across hosts). Takeovers are serialised by a
    second lock file (`.takeover`) and remove the lock only if it still holds what was judged dead."""

    def __init__(self, path: str | os.PathLike, log: Callable[[str], None] = print, *,
                 heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S, name: str = "hvpmtl-lock"):
        self.path, self.log = Path(path), log
        self.heartbeat_s, self.stale_s, self.name = heartbeat_s, stale_s, name
        self.nonce = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._seen: tuple = (None, None, 0.0)  # (content, mtime, when we first saw them unchanged)

    def try_acquire(self) -> bool:
        """Take the lock if it is free or dead; False while a live holder has it."""
        for _ in range(3):
            if self._create_safe():
                return True
            content, mtime = self._read()
            if content is None:
                continue  # released meanwhile
            why = self._dead(content, mtime)
            if not why:
                return False
            self._take_over(content, why)
        return False

    def _create_safe(self) -> bool:
        if not create_lock_file(self.path, holder_record(self.nonce)):
            return False
        self._thread = threading.Thread(target=self._beat, name=self.name, daemon=True)
        self._thread.start()
        return True

    def _read(self) -> tuple[Optional[bytes], Optional[float]]:
        return read_lock_file(self.path)

    def holder(self) -> str:
        content, _ = self._read()
        if content is None:
            return "nobody now"
        h = parse_holder(content)
        return describe_holder(h) if h else f"unreadable content {content[:60]!r}"

    def _dead(self, content: bytes, mtime: float) -> str:
        """Why the lock's holder is dead ('' while it may be alive)."""
        h = parse_holder(content)
        now = time.monotonic()
        if (content, mtime) != self._seen[:2]:
            self._seen = (content, mtime, now)
        still = now - self._seen[2]
        if h is None:
            if time.time() - mtime > GARBAGE_GRACE_S or still > GARBAGE_GRACE_S:
                self.log(f"WARNING: {self.path} holds no holder record ({content[:60]!r}): taken as stale")
                return "unreadable lock"
            return ""
        gone = local_holder_gone(h)
        if gone is not None:
            return f"its holder ({describe_holder(h)}) is gone" if gone else ""
        if still > self.stale_s:
            return f"its holder's heartbeat ({describe_holder(h)}) has not moved for {still:.0f} s"
        return ""

    def _take_over(self, content: bytes, why: str) -> None:
        try:
            taken = take_over(self.path, content, leftover_after_s=TAKEOVER_STALE_S)
        except OSError:
            return  # cannot write here: try_acquire's create reports it
        if taken:
            self.log(f"took over the lock {self.path}: {why}")
        else:
            time.sleep(0.1)  # another process is taking it over, or it changed: look again

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # removed (taken over after a freeze) or a transient error: nothing to hold

    def release(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=1)
        self._thread = None
        h = parse_holder(self._read()[0])
        if h is not None and h.get("nonce") == self.nonce:
            self.path.unlink(missing_ok=True)
