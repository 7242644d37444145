"""The data index: the same data as the parse, compact, keyed to its source, built once under a lock."""
import hashlib
import json
import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

from hvpmtl.data.formats.index_build import build_list_index
from hvpmtl.data.formats.index_file import DataIndex
from hvpmtl.data.formats.index_format import default_index_path
from hvpmtl.data.formats.index_fresh import ensure_index
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.formats.list_file import read_list_file, write_list_file


def _write(tmp_path, n=300, distinct_confs=3, seed=0):
    rng = np.random.default_rng(seed)
    confs = [1.0, 0.9, 0.8] if distinct_confs == 3 else list(np.round(rng.uniform(0.01, 1, distinct_confs), 6))
    entries = [(f"d/{i}.jpg", {int(k): float(rng.choice(confs)) for k in rng.choice(50, rng.integers(0, 6), replace=False)})
               for i in range(n)]
    p = tmp_path / "train.txt"
    write_list_file(p, entries)
    with open(p, "a") as f:
        f.write("d/0.jpg 1:1\nbad 3-1\n")  # a duplicate path and a malformed line
    return p


@pytest.mark.parametrize("distinct", [3, 400])
def test_index_holds_what_the_parse_holds(tmp_path, distinct):
    p = _write(tmp_path, distinct_confs=distinct)
    ref, issues = read_list_file(p, 50)
    idx = DataIndex(build_list_index(p, num_classes=50))
    assert idx.path == default_index_path(p) and len(idx) == len(ref) == 300
    assert bytes(idx.path_blob) == ref.path_blob and np.array_equal(idx.path_offsets, ref.path_offsets)
    for k in ("lines", "indptr", "classes"):
        assert np.array_equal(getattr(idx, k), getattr(ref, k)), k
    assert np.array_equal(idx.conf_values(np.arange(idx.header["nnz"])), ref.confs)  # exact, not rounded
    # compact: one byte per confidence when few distinct values, int32 where it fits
    assert idx.confs.dtype == (np.uint8 if distinct == 3 else np.float32)
    assert idx.classes.dtype == np.int32 and idx.lines.dtype == np.int32 and idx.indptr.dtype == np.int32
    assert [(i.code, i.line, i.message) for i in idx.issues()] == \
        [(i.code, i.line, i.message) for i in issues if i.code != "no-labels"]
    assert not idx.verdict.any()  # nothing checked yet
    assert not idx.classes.flags.writeable  # a read-only mapping, shared by every rank


def test_the_index_opens_in_pandas_and_duckdb_as_built(tmp_path):
    """The index is an Arrow IPC (Feather v2) file: what docs/DATA.md shows reads the paths, lines and labels the
    parse holds, and the verdicts by name."""
    import duckdb
    import pandas as pd
    import pyarrow.feather as feather

    p = _write(tmp_path)
    ref, _ = read_list_file(p, 50)
    path = build_list_index(p, num_classes=50)
    paths = [bytes(ref.path_blob[ref.path_offsets[i]:ref.path_offsets[i + 1]]).decode() for i in range(len(ref))]
    labels = [[(int(c), float(f)) for c, f in zip(ref.classes[ref.indptr[i]:ref.indptr[i + 1]],
                                                 ref.confs[ref.indptr[i]:ref.indptr[i + 1]])] for i in range(len(ref))]
    df = pd.read_feather(path)
    assert list(df.columns) == ["path", "line", "labels", "verdict", "width", "height"]
    assert df["path"].tolist() == paths and df["line"].tolist() == ref.lines.tolist()
    assert [[(d["class"], d["conf"]) for d in row] for row in df["labels"]] == labels
    assert set(df["verdict"].astype(str)) == {"unchecked"}
    t = feather.read_table(path, memory_map=True)  # zero-copy; duckdb scans it by its Python name
    got = duckdb.sql("select path, line, labels from t order by line").fetchall()
    assert [r[0] for r in got] == paths and [r[1] for r in got] == ref.lines.tolist()
    assert [[(d["class"], d["conf"]) for d in r[2]] for r in got] == labels
    empty = duckdb.sql("select count(*) from t where len(labels) = 0").fetchall()[0][0]
    assert empty == int((np.diff(ref.indptr) == 0).sum()) > 0
    # docs/DATA.md's lines, as they are there
    rows = duckdb.sql("select path, line, len(labels) as n from t where verdict <> 'ok'").fetchall()
    assert sorted(rows) == sorted((q, int(li), len(lab)) for q, li, lab in zip(paths, ref.lines, labels))
    assert json.loads(t.schema.metadata[b"hvpmtl.header"])["key"]["size"] == p.stat().st_size
    meta = t.schema.metadata
    assert meta[b"hvpmtl.index"] == b"hvpmtl-data-index-v2"
    assert json.loads(meta[b"hvpmtl.header"])["key"]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()


def test_fresh_stale_and_copied(tmp_path):
    p = _write(tmp_path)
    build_list_index(p, num_classes=50)
    assert ensure_index("list", p, num_classes=50, auto_build_max=0) is not None
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a copy without -p: same bytes, new mtime
    assert ensure_index("list", p, num_classes=50, auto_build_max=0) is not None
    with pytest.raises(DataError, match="built for 50 classes, data.num_classes is 60(.|\n)*hvpmtl data index "
                                        "--list .*train.txt --num-classes 60"):
        ensure_index("list", p, num_classes=60, auto_build_max=0)
    with open(p, "a") as f:
        f.write("d/new.jpg 1:1\n")
    with pytest.raises(DataError, match="stale: .*has changed(.|\n)*`hvpmtl data index --list"):
        ensure_index("list", p, num_classes=50, auto_build_max=0)
    with pytest.raises(DataError, match="more than data.index_auto_build=100 samples"):
        ensure_index("list", p, num_classes=50, auto_build_max=100)
    idx = ensure_index("list", p, num_classes=50, auto_build_max=1000, log=lambda m: None)  # small: built here
    assert len(idx) == 301


def _build_in_process(args):
    path, builder, out = args
    got = []
    idx = ensure_index("list", path, num_classes=50, builder=builder, wait_s=60, log=got.append)
    with open(out, "a") as f:
        f.write(f"{os.getpid()} {len(idx)} {int(any('building' in m for m in got))}\n")


@pytest.mark.slow
def test_one_process_builds_the_others_wait(tmp_path):
    p = _write(tmp_path, n=20000)
    out = tmp_path / "who.txt"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(_build_in_process, [(str(p), i < 2, str(out)) for i in range(4)])
    rows = [line.split() for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {r[1] for r in rows} == {"20000"}
    assert sum(int(r[2]) for r in rows) == 1  # built once
    assert not default_index_path(p).with_name("train.txt.hvpidx.lock").exists()


def test_waiters_get_the_builders_error_and_an_old_unreadable_lock_is_stale(tmp_path):
    p = _write(tmp_path)
    lock = default_index_path(p).with_name("train.txt.hvpidx.lock")
    lock.write_text("node7 pid 123 since then\n")  # the format before locks held JSON: no holder record

    def fail_later():
        time.sleep(0.5)
        lock.with_name("train.txt.hvpidx.failed").write_text("train.txt:3: the builder's own message")
    threading.Thread(target=fail_later).start()
    with pytest.raises(DataError, match="the builder's own message"):
        ensure_index("list", p, num_classes=50, builder=False, wait_s=30)
    lock.with_name("train.txt.hvpidx.failed").unlink()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    said = []
    idx = ensure_index("list", p, num_classes=50, builder=True, wait_s=5, log=said.append)
    assert len(idx) == 300 and not lock.exists()
    assert any("holds no holder record" in m and "taken as stale" in m for m in said), said
