"""Issue 23, items 4, 5 and 7: the data index checks what it cannot trust, its build lock recovers, paths
that leave the image root through a symlink and `./x.jpg` beside `x.jpg` are found. Every case runs a real
command (`hvpmtl data ...` in a process or through hvpmtl.cli.main, or the pre-training launcher) and ends
in a message naming the file, never a traceback, a signal or a wait past its bound."""
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import hvpmtl.data.formats.index_build as index_mod
from hvpmtl.cli import main as cli_main
from hvpmtl.data.formats.index_build import build_list_index
from hvpmtl.data.formats.index_file import DataIndex
from hvpmtl.data.formats.index_format import default_index_path
from hvpmtl.data.formats.index_fresh import ensure_index
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.formats.list_file import write_list_file
from hvpmtl.data.loaders.labels import LabelTable
from hvpmtl.data.loaders.prepare import prepare_list
from hvpmtl.data.tools.synthetic import make_synthetic
from subprocs import run_cmd

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[3]


def _list(tmp_path, n=200, name="train.txt"):
    rng = np.random.default_rng(0)
    entries = [(f"d/{i}.jpg", {int(k): float(rng.choice([1.0, 0.9, 0.8]))
                               for k in rng.choice(50, rng.integers(1, 6), replace=False)}) for i in range(n)]
    p = tmp_path / name
    write_list_file(p, entries)
    return p


def _hvpmtl(*args, cwd, timeout=120):
    rc, out = run_cmd([str(BIN / "hvpmtl"), "data", *map(str, args)], cwd=cwd, timeout=timeout)
    assert rc >= 0, f"killed by signal {-rc}:\n{out}"
    assert "Traceback" not in out, out
    return rc, out


def _overwrite(p: Path, at: int, raw: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(at)
        f.write(raw)


def _poke(path: Path, array: str, pos: int, value) -> None:
    """Overwrite value `pos` of array `array` in place (disk damage, a bad edit)."""
    idx = DataIndex(path)
    a = idx.arrays[array]
    off = idx.file_offset(array) + pos * a.dtype.itemsize
    raw = np.asarray([value], a.dtype).tobytes()
    idx.close()
    _overwrite(path, off, raw)


# ----------------------------------------------------------------------------- the header and the arrays


def _patch_schema(p: Path, old: bytes, new: bytes) -> None:
    """Replace bytes of the schema in place, keeping their length: it is stored twice (after the magic and in
    the footer), both are changed."""
    assert len(old) == len(new)
    raw = p.read_bytes()
    assert raw.count(old) == 2, old
    at = [raw.index(old), raw.rindex(old)]
    for a in at:
        _overwrite(p, a, new)


def _retype(p: Path, column: str, make) -> None:
    """Rewrite the index with `column` replaced by `make(old column)`, metadata kept: a file whose column has
    a type the index does not have (another tool's, or a bad edit)."""
    t = pa.ipc.open_file(pa.py_buffer(p.read_bytes())).read_all()  # in memory: the file is rewritten below
    meta = t.schema.metadata
    t = t.set_column(t.schema.get_field_index(column), column, make(t.column(column)))
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, t.schema.with_metadata(meta)) as w:
        w.write_table(t)


def _past_the_end(p: Path) -> None:
    """The record batch's buffer of class ids claims 1 GiB more bytes than the file holds."""
    idx = DataIndex(p)
    at, nbytes = idx.file_offset("classes"), len(idx.classes) * 4
    idx.close()
    raw = p.read_bytes()
    buf = pa.py_buffer(raw)
    reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(buf.slice(8)))  # the stream after the magic
    while (m := reader.read_next_message()).type != "record batch":
        pass
    meta, body = m.metadata.address - buf.address, m.body.address - buf.address
    spec = struct.pack("<qq", at - body, nbytes)  # the Buffer {offset in the body, length} of the class ids
    where = raw.index(spec, meta, meta + m.metadata.size)
    _overwrite(p, where + 8, struct.pack("<q", nbytes + 2**30))


DAMAGES = {
    "footer length 2^31-1": lambda p: _overwrite(p, p.stat().st_size - 10, (2**31 - 1).to_bytes(4, "little")),
    "unknown type": lambda p: _retype(p, "line", lambda c: c.cast(pa.float64())),
    "nested type": lambda p: _retype(p, "labels", lambda c: pa.array([["x"]] * len(c), pa.list_(pa.string()))),
    "array past the end": _past_the_end,
    "unknown column": lambda p: _patch_schema(p, b"\x07\x00\x00\x00verdict\x00", b"\x07\x00\x00\x00verdicX\x00"),
    "truncated": lambda p: os.truncate(p, p.stat().st_size - 100),
    "indptr end": lambda p: _poke(p, "indptr", 200, 7),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_index_is_named_by_verify_and_rebuilt(tmp_path, damage):
    p = _list(tmp_path)
    out = default_index_path(p)
    assert _hvpmtl("index", "--list", p, "--num-classes", 50, cwd=tmp_path)[0] == 0
    DAMAGES[damage](out)
    with pytest.raises(DataError, match=f"{out.name}: (damaged|truncated|not an)"):
        DataIndex(out)
    rc, text = _hvpmtl("index", "--list", p, "--num-classes", 50, "--verify", cwd=tmp_path)
    assert rc == 2 and f"error: {out}" in text and "--force" in text, text
    # a plain `index` rebuilds what is damaged; start-up does too for a small data set
    rc, text = _hvpmtl("index", "--list", p, "--num-classes", 50, cwd=tmp_path)
    assert rc == 0 and "rebuilding" in text and "200 samples" in text, text
    assert _hvpmtl("index", "--list", p, "--num-classes", 50, "--verify", cwd=tmp_path)[0] == 0


def _old_format_index(out: Path, source: Path) -> None:
    """What hvpmtl wrote before Arrow IPC (hvpmtl-data-index-v1): its magic, then its JSON header (which names the
    source and the class count), then the arrays."""
    head = json.dumps({"format": "hvpmtl-data-index-v1", "kind": "list", "source": str(source.resolve()),
                       "num_classes": 50}).encode()
    out.write_bytes(b"HVPIDX\0\1" + len(head).to_bytes(8, "little") + head + bytes(4096))


def test_an_index_in_the_old_format_is_refused_naming_the_command_and_rebuilt_like_a_stale_one(tmp_path):
    p = _list(tmp_path)
    out = default_index_path(p)
    _old_format_index(out, p)
    cmd = f"hvpmtl data index --list {p.resolve()} --num-classes 50"
    with pytest.raises(DataError, match=re.escape(f"{out}: a data index in the old format (hvpmtl-data-index-v1, "
                                                  f"before Arrow IPC), which this hvpmtl does not read; rebuild it "
                                                  f"with `{cmd}`")):
        DataIndex(out)
    # start-up: a big data set names the command, a small one is rebuilt (the stale-index policy)
    with pytest.raises(DataError, match="old format(.|\n)*Build the data index once with `hvpmtl data index --list"):
        ensure_index("list", p, num_classes=50, auto_build_max=0)
    assert len(ensure_index("list", p, num_classes=50, auto_build_max=1000, log=lambda m: None)) == 200
    _old_format_index(out, p)
    rc, text = _hvpmtl("index", "--list", p, "--num-classes", 50, cwd=tmp_path)
    assert rc == 0 and "rebuilding" in text and "old format" in text and "200 samples" in text, text
    assert DataIndex(out).header["format"] == "hvpmtl-data-index-v2"


def test_a_flipped_valid_class_id_is_found_by_the_checksum_and_the_validator_rebuilds(tmp_path):
    syn = make_synthetic(tmp_path / "syn", 12, seed=0)
    lst = Path(syn["list_file"])
    assert cli_main(["data", "index", "--list", str(lst), "--num-classes", "24"]) == 0
    out = default_index_path(lst)
    idx = DataIndex(out)
    want = int(idx.classes[0])
    idx.close()
    _poke(out, "classes", 0, (want + 1) % 24)  # another valid class: no bound can see it
    idx = DataIndex(out)
    assert int(idx.classes[0]) != want and idx.verify() == ["the sha256 checksum does not match the content"]
    idx.close()
    rc, text = _hvpmtl("index", "--list", lst, "--num-classes", 24, "--verify", cwd=tmp_path)
    assert rc == 2 and "checksum does not match" in text
    rc, text = _hvpmtl("validate", "--list", lst, "--root", syn["root"], "--num-classes", 24, cwd=tmp_path)
    assert rc == 0 and "damaged: the sha256 checksum does not match" in text, text
    assert int(DataIndex(out).classes[0]) == want


def test_labels_are_bounds_checked_per_batch_naming_index_and_sample(tmp_path):
    p = _list(tmp_path)
    out = build_list_index(p, num_classes=50, log=lambda m: None)
    cases = [("classes", 999, "class id 999 outside \\[0, 49\\]"),
             ("confs", 7, "confidence code 7 outside its table of 3"),
             ("indptr", None, "its labels are rows")]
    for array, value, msg in cases:
        shutil.copy(out, tmp_path / "good")
        idx = DataIndex(out)
        pos = 5 if array == "indptr" else int(idx.indptr[5])  # sample 5 (its first label)
        if value is None:  # a damaged indptr: one row takes 438 labels of the others
            value = int(idx.indptr[pos]) + 438
        idx.close()
        _poke(out, array, pos, value)
        prep = prepare_list(str(p), str(tmp_path), num_classes=50, skip_corrupt=False)
        table = LabelTable(prep.samples, 50)
        table.dense(np.arange(0, 3))  # rows that are fine read fine
        with pytest.raises(DataError, match=f"{out}: damaged data index at sample [45] \\({p}:[56]\\): {msg}"):
            table.dense(np.arange(0, 10))
        os.replace(tmp_path / "good", out)


READER = textwrap.dedent("""
    import sys, time, numpy as np
    from hvpmtl.data.formats.issues import DataError
    from hvpmtl.data.loaders.labels import LabelTable
    from hvpmtl.data.loaders.prepare import prepare_list
    p, root, flag = sys.argv[1:4]
    prep = prepare_list(p, root, num_classes=50, skip_corrupt=False)
    table = LabelTable(prep.samples, 50)
    table.dense(np.arange(8)); prep.samples.path(0)
    open(flag, "w").close()
    try:
        for _ in range(3000):  # a running job: a batch every few ms until the index changes under it
            table.dense(np.arange(200)); prep.samples.path(199)
            time.sleep(0.01)
    except DataError as e:
        print(f"hvpmtl: data error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
""")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "copy over"])
def test_an_index_changed_in_place_under_a_reader_is_an_error_not_sigbus(tmp_path, how):
    p = _list(tmp_path, n=20000)
    out = build_list_index(p, num_classes=50, log=lambda m: None)
    other = build_list_index(_list(tmp_path, n=20000, name="other.txt"), num_classes=50, log=lambda m: None)
    flag = tmp_path / "reading"
    proc = subprocess.Popen([sys.executable, "-c", READER, str(p), str(tmp_path), str(flag)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if how == "truncate":
        os.truncate(out, 4096)
    else:  # `cp other.hvpidx train.txt.hvpidx`: the same inode, other bytes
        shutil.copyfile(other, out)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, (proc.returncode, text)  # not -7 (SIGBUS)
    assert f"{out} was " in text and "in place" in text and "Traceback" not in text, text


# ----------------------------------------------------------------------------- fresh by content, --force


def test_a_list_edited_keeping_size_and_mtime_is_rebuilt_by_index_and_named_by_verify(tmp_path):
    p = _list(tmp_path)
    assert _hvpmtl("index", "--list", p, "--num-classes", 50, cwd=tmp_path)[0] == 0
    rc, text = _hvpmtl("index", "--list", p, "--num-classes", 50, cwd=tmp_path)
    assert rc == 0 and "up to date" in text and "--force" in text  # nothing rebuilt: verdicts kept
    rc, text = _hvpmtl("index", "--list", p, "--num-classes", 50, "--force", cwd=tmp_path)
    assert rc == 0 and "200 samples" in text
    st = p.stat()
    data = p.read_bytes()
    p.write_bytes(data.replace(b"d/7.jpg", b"d/8.jpg", 1))  # same size; mtime put back below
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ensure_index("list", p, num_classes=50, auto_build_max=0) is not None  # start-up trusts size + mtime
    rc, text = _hvpmtl("index", "--list", p, "--num-classes", 50, "--verify", cwd=tmp_path)
    assert rc == 2 and "content differs" in text, text
    rc, text = _hvpmtl("index", "--list", p, "--num-classes", 50, cwd=tmp_path)
    assert rc == 0 and "rebuilding" in text and "content differs" in text, text
    assert "duplicate-path: 1" in text  # the edit made d/8.jpg appear twice: the new content was parsed


# ----------------------------------------------------------------------------- the build lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_killed_build_neither_blocks_nor_litters_and_the_launcher_starts_at_once(tmp_path, monkeypatch):
    # a list big enough that the build takes a while; killed -9 once its build folder exists
    lst = tmp_path / "train.txt"
    syn = make_synthetic(tmp_path / "syn", 16, seed=0)
    lines = Path(syn["list_file"]).read_text().splitlines()
    with open(lst, "w") as f:
        f.write("\n".join(lines) + "\n")
        rng = np.random.default_rng(0)
        for i in range(400_000):  # missing images: they are never opened before the model is built
            f.write(f"gone/{i:07d}.jpg\t{rng.integers(24)}:1\t{rng.integers(24)}:0.9\n")
    out = default_index_path(lst)
    proc = subprocess.Popen([str(BIN / "hvpmtl"), "data", "index", "--list", str(lst), "--num-classes", "24"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out.with_name(out.name + ".lock")
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and list(tmp_path.glob(f".{out.name}.build-*/paths"))):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock.exists() and json.loads(lock.read_text())["pid"] == proc.pid
    assert list(tmp_path.glob(f".{out.name}.build-*")) and not out.exists()

    import hvpmtl.train.pretrain as pretrain

    class Stop(Exception):
        pass
    reached = []

    def model(*a, **k):
        reached.append("model")
        raise Stop
    monkeypatch.setattr(pretrain, "HVPMetaArch", model)
    t = time.monotonic()
    # start-up got past the data: it reached the model (the launcher's boundary reports the stop: exit 1)
    code = pretrain.main(["--config", "configs/test_tiny.yaml", "--resume", "none", "--set",
                          f"run.output_dir={tmp_path / 'run'}", "--set", "tracking.enabled=false", "--set",
                          "data.format=tencent", "--set", f"data.root={syn['root']}", "--set", f"data.list_file={lst}",
                          "--set", "data.num_classes=24", "--set", "data.device=cpu", "--set", "data.skip_corrupt=true",
                          "--set", "data.index_wait_s=600"])
    assert reached == ["model"] and code == 1
    assert time.monotonic() - t < 300  # far below data.index_wait_s: the dead builder's lock was taken over
    assert not lock.exists() and out.exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(f".{out.name}.")]  # no build folder, no temp file


@pytest.mark.parametrize("content", ['{"host": "%s", "pid": "x"}' % socket.gethostname(), "[1, 2]",
                                     "node7 pid 123 since then\n", ""])
def test_a_garbage_lock_is_stale_with_a_warning(tmp_path, capsys, content):
    p = _list(tmp_path)
    out = default_index_path(p)
    lock = out.with_name(out.name + ".lock")
    lock.write_text(content)
    old = time.time() - 60
    os.utime(lock, (old, old))
    t = time.monotonic()
    assert cli_main(["data", "index", "--list", str(p), "--num-classes", "50"]) == 0
    text = capsys.readouterr().out
    assert "holds no holder record" in text and "taken as stale" in text and "200 samples" in text
    assert time.monotonic() - t < 30 and not lock.exists()


def test_a_dead_holder_on_this_host_is_taken_over_at_once_a_live_one_is_waited_for(tmp_path, monkeypatch):
    p = _list(tmp_path)
    out = default_index_path(p)
    lock = out.with_name(out.name + ".lock")
    host = socket.gethostname()
    lock.write_text(json.dumps({"host": host, "pid": _dead_pid(), "nonce": "x", "since": "then"}))
    # a takeover that died half-way leaves its file: it does not block either
    out.with_name(out.name + ".lock.takeover").write_text("")
    old = time.time() - 60
    os.utime(out.with_name(out.name + ".lock.takeover"), (old, old))
    logs = []
    t = time.monotonic()
    idx = ensure_index("list", p, num_classes=50, wait_s=600, log=logs.append)
    assert len(idx) == 200 and time.monotonic() - t < 30
    assert any("took over" in m and "is gone" in m for m in logs), logs
    assert not lock.exists() and not out.with_name(out.name + ".lock.takeover").exists()
    # a live holder on this host (this very test process's parent) is never taken over: waited for, then named
    os.remove(out)
    lock.write_text(json.dumps({"host": host, "pid": os.getppid(), "nonce": "y", "since": "now"}))
    with pytest.raises(DataError, match=f"waited 2 s for the data index .*being built by {host} pid {os.getppid()}"):
        ensure_index("list", p, num_classes=50, wait_s=2, log=lambda m: None)
    assert lock.exists()


def test_another_hosts_lock_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(index_mod, "LOCK_STALE_S", 1.5)
    p = _list(tmp_path)
    out = default_index_path(p)
    lock = out.with_name(out.name + ".lock")
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 4242, "nonce": "z", "since": "now"}))
    stop = []

    import threading

    def beat():  # the other host's builder, alive: its heartbeat moves the mtime
        k = 0
        while not stop:
            k += 1
            os.utime(lock, (1e9 + k, 1e9 + k))  # a clock far off: only the movement counts
            time.sleep(0.2)
    th = threading.Thread(target=beat)
    th.start()
    try:
        with pytest.raises(DataError, match="being built by node-elsewhere pid 4242"):
            ensure_index("list", p, num_classes=50, wait_s=3, log=lambda m: None)
    finally:
        stop.append(1)
        th.join()
    logs = []
    t = time.monotonic()
    idx = ensure_index("list", p, num_classes=50, wait_s=60, log=logs.append)  # heartbeat stopped: taken over
    assert len(idx) == 200 and time.monotonic() - t < 30
    assert any("heartbeat" in m and "node-elsewhere" in m for m in logs), logs


def test_leftovers_of_dead_builds_are_removed_live_ones_kept(tmp_path):
    p = _list(tmp_path)
    out = default_index_path(p)
    host = socket.gethostname()
    dead = tmp_path / f".{out.name}.build-{host}-{_dead_pid()}-abc123"
    dead.mkdir()
    (dead / "paths").write_bytes(b"x" * 1000)
    dead_tmp = tmp_path / f".{out.name}.tmp-{host}-{_dead_pid()}"
    dead_tmp.write_bytes(b"y")
    live = tmp_path / f".{out.name}.build-{host}-{os.getppid()}-def456"  # a live process's: kept
    live.mkdir()
    legacy = tmp_path / ".hvpidx-build-k2j3h4"  # hvpmtl before the lock recorded its holder
    legacy.mkdir()
    (legacy / "paths").write_bytes(b"z")
    old = time.time() - 2 * index_mod.LEFTOVER_IDLE_S
    for q in (legacy / "paths", legacy):
        os.utime(q, (old, old))
    assert cli_main(["data", "index", "--list", str(p), "--num-classes", "50"]) == 0
    assert not dead.exists() and not dead_tmp.exists() and not legacy.exists() and live.exists()


# ----------------------------------------------------------------------------- paths: symlinks, duplicates


def test_a_symlink_out_of_the_root_is_reported_like_a_textual_escape(tmp_path):
    syn = make_synthetic(tmp_path / "syn", 8, seed=0)
    lst, root = Path(syn["list_file"]), Path(syn["root"])
    lines = lst.read_text().splitlines()
    victim = lines[2].split()[0]
    outside = tmp_path / "outside.jpg"
    shutil.copy(root / victim, outside)
    (root / victim).unlink()
    (root / victim).symlink_to(outside)  # a valid JPEG, but not under the root
    inside = lines[4].split()[0]  # a link that stays inside the root is fine
    shutil.move(root / inside, root / "moved.jpg")
    (root / inside).symlink_to(root / "moved.jpg")
    skip = tmp_path / "skip.txt"
    rc, text = _hvpmtl("validate", "--list", lst, "--root", root, "--write-skip-list", skip, cwd=tmp_path)
    assert rc == 1 and f"train.txt:3: error [bad-path] ({victim})" in text and str(outside) in text, text
    assert text.count("[bad-path]") == 1
    assert skip.read_text().splitlines()[1:] == [f"{lst}\t3\t{victim}\tbad-path"]
    rc, text = _hvpmtl("validate", "--list", lst, "--root", root, "--allow-outside-root", cwd=tmp_path)
    assert rc == 0 and "[bad-path]" not in text, text
    # training without validate first: the reader refuses the link naming file:line (the same message as a
    # textual escape), or leaves it out under skip_corrupt; data.allow_outside_root reads it
    from hvpmtl.data.loaders.file_reader import FileReader
    from hvpmtl.data.loaders.prepare import Skipped
    prep = prepare_list(str(lst), str(root), num_classes=len(Path(syn["dictionary"]).read_text().splitlines()),
                        skip_corrupt=False)
    with pytest.raises(DataError, match=rf"train.txt:3 \({victim}\): \[bad-path\] .* resolves to {outside}, "
                                        r"outside the image root .*data.allow_outside_root"):
        FileReader(str(root), prep.samples)([2])
    skipped = Skipped()
    _, ids = FileReader(str(root), prep.samples, skip_corrupt=True, skipped=skipped)([2, 4])
    assert list(ids) == [3, 4] and skipped.runtime == 1  # the link inside the root is read
    images, ids = FileReader(str(root), prep.samples, allow_outside_root=True)([2])
    assert list(ids) == [2] and images[0].tobytes() == outside.read_bytes()


def test_duplicates_are_found_on_normalised_paths(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("x.jpg\t1:1\n./x.jpg\t2:1\na//b.jpg\t1:1\na/b.jpg\t1:0.9\nc/./d.jpg\t1:1\nc/d.jpg\t3:1\ne.jpg\t1:1\n")
    rc, text = _hvpmtl("index", "--list", p, "--num-classes", 5, cwd=tmp_path)
    assert rc == 0 and "4 samples" in text and "duplicate-path: 3" in text, text
    idx = DataIndex(default_index_path(p))
    assert [(i.code, i.line, i.path) for i in idx.issues()] == [
        ("duplicate-path", 2, "./x.jpg"), ("duplicate-path", 4, "a/b.jpg"), ("duplicate-path", 6, "c/d.jpg")]


@pytest.mark.slow
def test_training_on_an_index_with_an_out_of_range_class_stops_with_a_message(tmp_path, capsys):
    syn = make_synthetic(tmp_path / "syn", 16, seed=0)
    lst = Path(syn["list_file"])
    assert cli_main(["data", "index", "--list", str(lst), "--num-classes", "24"]) == 0
    out = default_index_path(lst)
    idx = DataIndex(out)
    nnz = len(idx.classes)
    idx.close()
    for k in range(nnz):  # every label damaged: whichever sample comes first names itself
        _poke(out, "classes", k, 1000 + k)
    import hvpmtl.train.pretrain as pretrain
    rc = pretrain.main(["--config", "configs/test_tiny.yaml", "--resume", "none", "--set",
                        f"run.output_dir={tmp_path / 'run'}", "--set", "tracking.enabled=false", "--set",
                        "data.format=tencent", "--set", f"data.root={syn['root']}", "--set", f"data.list_file={lst}",
                        "--set", "data.num_classes=24", "--set", "data.device=cpu", "--set", "data.rand_augment_n=0"])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err and f"{out}: damaged data index at sample" in err and f"({lst}:" in err, err[-3000:]
