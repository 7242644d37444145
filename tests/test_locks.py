"""hvpmtl.locks, the primitive of both lock files: the holder record, a live process vs a gone or reused pid, what
counts as a holder record, and a takeover that removes only what was judged dead."""
import json
import os
import socket
import subprocess

from hvpmtl.locks import (create_lock_file, describe_holder, holder_record, local_holder_gone, parse_holder,
                          process_alive, process_start_time, read_lock_file, take_over)


def test_the_holder_record_names_this_process_and_reads_back(tmp_path):
    path = tmp_path / "x.lock"
    assert create_lock_file(path, holder_record("n1", job="77"))
    assert not create_lock_file(path, holder_record("n2"))
    content, mtime = read_lock_file(path)
    h = parse_holder(content)
    assert (h["host"], h["pid"], h["nonce"], h["job"]) == (socket.gethostname(), os.getpid(), "n1", "77")
    assert h["start"] == process_start_time(os.getpid()) and mtime == path.stat().st_mtime
    assert describe_holder(h).startswith(f"{socket.gethostname()} pid {os.getpid()}, Slurm job 77, since ")
    assert read_lock_file(tmp_path / "none") == (None, None)


def test_a_gone_or_reused_pid_is_dead_a_live_one_is_not():
    proc = subprocess.Popen(["sleep", "60"])
    start = process_start_time(proc.pid)
    try:
        assert process_alive(proc.pid, start) and process_alive(proc.pid, None)
        assert not process_alive(proc.pid, str(int(start) + 1))  # the pid now names another process
        me = {"host": socket.gethostname(), "pid": proc.pid, "start": start}
        assert local_holder_gone(me) is False
        assert local_holder_gone(dict(me, host="node-elsewhere")) is None  # judged by its heartbeat instead
    finally:
        proc.kill()
        proc.wait()
    assert not process_alive(proc.pid, start) and local_holder_gone(me) is True


def test_only_a_dict_with_a_host_and_a_valid_pid_is_a_holder_record():
    good = {"host": "h", "pid": 12}
    assert parse_holder(json.dumps(good).encode()) == good
    for bad in (b"", b"node7 pid 123 since then\n", b"[1, 2]", b'{"host": "h"}', b'{"host": "h", "pid": 0}',
                b'{"host": "h", "pid": true}', b'{"host": 3, "pid": 12}', b'{"host": "h", "pid": "12"}', None):
        assert parse_holder(bad) is None, bad


def test_a_takeover_removes_the_lock_only_if_it_still_holds_what_was_judged(tmp_path):
    path = tmp_path / "x.lock"
    path.write_bytes(b"dead holder")
    assert not take_over(path, b"another holder", leftover_after_s=10)  # it changed since it was judged
    assert path.exists() and not (tmp_path / "x.lock.takeover").exists()
    guard = tmp_path / "x.lock.takeover"
    guard.write_text("")  # another taker is at work
    assert not take_over(path, b"dead holder", leftover_after_s=10) and guard.exists() and path.exists()
    os.utime(guard, (1, 1))  # ... or died half-way: its file is removed, the next try takes over
    assert not take_over(path, b"dead holder", leftover_after_s=10) and not guard.exists()
    assert take_over(path, b"dead holder", leftover_after_s=10)
    assert not path.exists() and not guard.exists()
