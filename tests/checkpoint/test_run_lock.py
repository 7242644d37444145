"""The output_dir lock: O_EXCL file + heartbeat mtime; a live holder is refused at once, a dead or silent one
is taken over (the requeue after kill -9), and a holder that lost its lock knows it."""
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from hvpmtl.locks import process_start_time as _start_time
from hvpmtl.checkpoint.run_lock import LOCK_NAME, LockError, RunLock


def _holder(path, **kw):
    h = {"host": socket.gethostname(), "pid": 0, "start": None, "nonce": "x", "job": "", "since": "then"}
    h.update(kw)
    path.write_text(json.dumps(h))


def _quiet(d, **kw):
    return RunLock(d, log=lambda m: None, **kw)


def test_acquire_writes_the_holder_and_a_second_lock_is_refused(tmp_path):
    lock = _quiet(tmp_path).acquire()
    try:
        h = json.loads((tmp_path / LOCK_NAME).read_text())
        assert h["host"] == socket.gethostname() and h["pid"] == os.getpid()
        sleeper = subprocess.Popen(["sleep", "60"])
        try:  # another process on this host holds it
            (tmp_path / LOCK_NAME).unlink()
            _holder(tmp_path / LOCK_NAME, pid=sleeper.pid, start=_start_time(sleeper.pid))
            with pytest.raises(LockError, match=f"in use by another job: {socket.gethostname()} pid {sleeper.pid}"):
                _quiet(tmp_path).acquire()
        finally:
            sleeper.kill()
            sleeper.wait()
        # its holder is gone now (kill -9): taken over at once
        said = []
        again = RunLock(tmp_path, log=said.append).acquire()
        assert any("its holder" in s and "is gone" in s for s in said)
        again.release()
        assert not (tmp_path / LOCK_NAME).exists()
    finally:
        lock.release()


def test_a_reused_pid_does_not_keep_a_dead_lock(tmp_path):
    _holder(tmp_path / LOCK_NAME, pid=os.getppid(), start="1")  # a live pid, but not the process that locked
    _quiet(tmp_path).acquire().release()


def test_holder_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    path = tmp_path / LOCK_NAME
    _holder(path, host="node-elsewhere", pid=123)
    with pytest.raises(LockError, match="node-elsewhere pid 123.*heartbeat 0 s ago"):
        _quiet(tmp_path, heartbeat_s=0.2, stale_after_s=5).acquire()
    # old, and it does not move while watched: stale
    os.utime(path, (time.time() - 60, time.time() - 60))
    lock = _quiet(tmp_path, heartbeat_s=0.2, stale_after_s=5).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    # old by our clock but still beating (clock skew with the file server): refused
    _holder(path, host="node-elsewhere", pid=123)
    os.utime(path, (time.time() - 60, time.time() - 60))
    stop = threading.Event()

    def beat():
        t = time.time() - 59
        while not stop.wait(0.05):
            t += 0.05
            os.utime(path, (t, t))
    threading.Thread(target=beat, daemon=True).start()
    try:
        with pytest.raises(LockError, match="its heartbeat moves, though its time looked [56][0-9] s old by this "
                                            "host's clock: this host's clock and the file server's differ"):
            _quiet(tmp_path, heartbeat_s=0.2, stale_after_s=5).acquire()
    finally:
        stop.set()


@pytest.mark.parametrize("content", ['{"host": "%s", "pid": "x"}' % socket.gethostname(), '[1, 2]', 'garbage'])
def test_a_lock_file_that_holds_no_holder_record_is_stale_with_a_warning(tmp_path, content):
    path = tmp_path / LOCK_NAME
    path.write_text(content)
    with pytest.raises(LockError, match="being written by another job starting now"):
        _quiet(tmp_path).acquire()  # just created: its creator is writing the record
    os.utime(path, (time.time() - 30, time.time() - 30))
    said = []
    lock = RunLock(tmp_path, log=said.append).acquire()
    assert json.loads(path.read_text())["nonce"] == lock.nonce
    assert any("holds no holder record: taken as stale" in s for s in said)
    lock.release()


def test_a_leftover_takeover_file_of_a_dead_taker_does_not_block(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _holder(tmp_path / LOCK_NAME, pid=dead.pid, start="1")  # a dead holder...
    _holder(tmp_path / (LOCK_NAME + ".takeover"), pid=dead.pid, start="1")  # ...and a taker that died mid-takeover
    lock = _quiet(tmp_path).acquire()  # at once, not "keeps changing hands" for minutes
    assert not (tmp_path / (LOCK_NAME + ".takeover")).exists()
    lock.release()


def test_a_heartbeat_from_the_future_names_the_clock_skew(tmp_path):
    path = tmp_path / LOCK_NAME
    _holder(path, host="node-elsewhere", pid=123)
    os.utime(path, (time.time() + 300, time.time() + 300))
    with pytest.raises(LockError, match="heartbeat (299|300) s in the future: this host's clock is behind"):
        _quiet(tmp_path, heartbeat_s=0.2, stale_after_s=5).acquire()


def test_a_lock_removed_by_hand_mid_run_is_held_again_not_reported_as_another_job(tmp_path):
    said = []
    lock = RunLock(tmp_path, heartbeat_s=0.05, log=said.append).acquire()
    path = tmp_path / LOCK_NAME
    path.unlink()  # a person "cleaning up"; no other job
    deadline = time.time() + 10
    while not any("was removed while this job held it; it holds it again" in s for s in said):
        assert time.time() < deadline, "the lock was not created again"
        time.sleep(0.05)
    assert json.loads(path.read_text())["nonce"] == lock.nonce and lock.lost is None
    lock.release()
    assert not path.exists()


def test_the_heartbeat_moves_the_mtime_and_a_lost_lock_is_noticed(tmp_path):
    lock = _quiet(tmp_path, heartbeat_s=0.05).acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (time.time() - 100, time.time() - 100))
    deadline = time.time() + 10
    while time.time() - path.stat().st_mtime > 50:
        assert time.time() < deadline, "no heartbeat"
        time.sleep(0.05)
    assert lock.lost is None
    _holder(tmp_path / "theirs", host="node-elsewhere", pid=7, nonce="theirs")
    os.replace(tmp_path / "theirs", path)  # another job took it over (atomically: the heartbeat never sees a gap)
    while lock.lost is None:
        assert time.time() < deadline + 10, "lost lock not noticed"
        time.sleep(0.05)
    assert "taken over by node-elsewhere pid 7" in lock.lost
    lock.release()
    assert path.exists()  # not ours: left alone
