"""The lock-file primitive of hvpmtl (the run lock, hvpmtl/checkpoint/run_lock.py, and the data index's build
lock, hvpmtl/data/index.py): the holder record, its atomic create, its liveness and the takeover. A holder is a
(pid, start time) pair, so a reused pid never keeps a dead holder's lock."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

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
    if not create_lock_file(guard, {}):
        try:
            if time.time() - guard.stat().st_mtime > leftover_after_s:
                guard.unlink()
        except FileNotFoundError:
            pass
        return False
    try:
        if read_lock_file(path)[0] == judged:
            path.unlink(missing_ok=True)
            return True
        return False
    finally:
        guard.unlink(missing_ok=True)
