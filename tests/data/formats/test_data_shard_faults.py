"""Issue 23 item 7: every tar / .idx / manifest.json / labels.npz fault is a one-line DataError naming the
file (exit 2, no traceback); a truncated tar has a way on: index-shards rewrites what it can, validate's skip
list is accepted by training, and validate and training agree on what is an error."""
import json
import shutil

import numpy as np
import pytest

from hvpmtl.cli import main
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.formats.shards import diagnose, read_index, readable_samples
from hvpmtl.data.loaders.prepare import prepare_shards
from hvpmtl.data.tools.synthetic import write_synthetic


@pytest.fixture(scope="module")
def shards_src(tmp_path_factory):
    out = tmp_path_factory.mktemp("shardfaults")
    write_synthetic(out / "syn", 12, shard_size=4)
    return out / "syn" / "shards"


@pytest.fixture
def shards(shards_src, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(shards_src, dst)
    return dst


def _cut(tar, keep_samples: int):
    """Truncate `tar` inside sample `keep_samples` + 1 (its first member's data), keeping the samples before."""
    first_cut = read_index(tar.with_suffix(".idx"))[keep_samples][0]
    with open(tar, "r+b") as f:
        f.truncate(first_cut[1] + 10)
    return tar


def _cmd(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _prepare(folder, **kw):
    return prepare_shards(str(folder), num_classes=24, **{"skip_corrupt": False, **kw})


def test_readable_samples_keeps_the_complete_samples_before_the_cut(shards):
    tar = _cut(shards / "shard-000001.tar", 2)
    samples, damage = readable_samples(tar)
    assert len(samples) == 2 and "past the end" in damage
    assert all({c[0] for c in s} == {"jpg", "id", "json"} for s in samples)


def test_truncated_tar_index_shards_then_validate_skip_list_then_training(shards, tmp_path, capsys):
    _cut(shards / "shard-000001.tar", 1)
    # training before the fix: refused, naming the index and the command
    with pytest.raises(DataError, match=r"shard-000001\.idx.*index-shards"):
        _prepare(shards)
    # index-shards: rewrites every index, names the damaged tar, exit 1 (samples were lost)
    code, out, err = _cmd(capsys, "data", "index-shards", str(shards))
    assert code == 1
    assert "shard-000001.idx: 1 samples" in out and "shard-000000.idx: 4 samples" in out
    assert "shard-000001.tar" in err and "past the end" in err
    assert len(read_index(shards / "shard-000001.idx")) == 1
    # training now refuses the 3 lost samples, and says how to go on
    with pytest.raises(DataError, match="3 sample"):
        _prepare(shards)
    # validate agrees (3 lost samples are errors, exit 1) and its skip list names them
    skip = tmp_path / "skip.txt"
    code, out, err = _cmd(capsys, "data", "validate", "--shards", str(shards), "--write-skip-list", str(skip))
    assert code == 1
    assert "(3 entries)" in out
    rows = [r.split("\t") for r in skip.read_text().splitlines()[1:]]
    assert sorted((r[0], int(r[1])) for r in rows) == [("shard-000001.tar", p) for p in (2, 3, 4)]
    # training accepts the skip list: 9 samples left, the 3 lost counted
    prep = _prepare(shards, skip_list=str(skip))
    assert len(prep.samples) == 9 and prep.skipped.skip_list == 3
    # and skip_corrupt alone also goes on
    assert len(_prepare(shards, skip_corrupt=True).samples) == 9


def test_validate_names_lost_samples_before_index_shards_too(shards, tmp_path, capsys):
    _cut(shards / "shard-000002.tar", 2)
    skip = tmp_path / "skip.txt"
    code, out, _ = _cmd(capsys, "data", "validate", "--shards", str(shards), "--write-skip-list", str(skip))
    assert code == 1 and "stale" in out and "(2 entries)" in out


def test_missing_idx_is_an_error_for_validate_as_for_training(shards, capsys):
    (shards / "shard-000000.idx").unlink()
    code, out, _ = _cmd(capsys, "data", "validate", "--shards", str(shards))
    assert code == 1 and "shard-000000.idx: error [bad-shard]" in out
    with pytest.raises(DataError, match=r"shard-000000\.idx: no DALI index"):
        _prepare(shards)


@pytest.mark.parametrize("content", [b"v1.2 x\n", b"v1.2 1\njpg zz 3 a.jpg\n", b"\xff\xfe\x00garbage", b"v1.2 1\n"])
def test_garbage_idx_is_named(shards, capsys, content):
    (shards / "shard-000001.idx").write_bytes(content)
    with pytest.raises(DataError, match=r"shard-000001\.idx"):
        _prepare(shards)
    code, _, err = _cmd(capsys, "data", "index", "--shards", str(shards))
    assert code == 2 and "shard-000001.idx" in err


@pytest.mark.parametrize("manifest", [b"\xff{}", b"[1, 2]", b'{"format": "hvpmtl-shards-v1", "shards": {"a": 1}}',
                                      b'{"format": "hvpmtl-shards-v1", "shards": [{"name": 3}]}',
                                      b'{"format": "hvpmtl-shards-v1", "shards": ["../x.tar"]}',
                                      b'{"format": "hvpmtl-shards-v1", "shards": [], "num_classes": "24"}'])
def test_garbage_manifest_is_named(shards, capsys, manifest):
    (shards / "manifest.json").write_bytes(manifest)
    with pytest.raises(DataError, match=r"manifest\.json"):
        _prepare(shards)
    for argv in (["data", "index", "--shards"], ["data", "validate", "--shards"]):
        code, out, err = _cmd(capsys, *argv, str(shards))
        assert code in (1, 2) and "manifest.json" in out + err


def _rewrite_labels(folder, **change):
    with np.load(folder / "labels.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(change)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(folder / "labels.npz", **arrays)


@pytest.mark.parametrize("fault", ["garbage", "half", "no-indptr", "bad-indptr", "pickled"])
def test_garbage_labels_npz_is_named(shards, capsys, fault):
    path = shards / "labels.npz"
    if fault == "garbage":
        path.write_bytes(b"PK\x03\x04 not a zip at all")
    elif fault == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif fault == "no-indptr":
        _rewrite_labels(shards, indptr=None)
    elif fault == "bad-indptr":
        _rewrite_labels(shards, indptr=np.arange(5, dtype=np.int64))
    else:
        _rewrite_labels(shards, lines=np.array([object()] * 3, dtype=object))
    with pytest.raises(DataError, match=r"labels\.npz"):
        _prepare(shards)
    code, _, err = _cmd(capsys, "data", "index", "--shards", str(shards))
    assert code == 2 and "labels.npz" in err
    err_found = diagnose(shards)
    assert err_found is not None and "labels.npz" in str(err_found)


def test_unreadable_tar_with_no_sample_is_named_and_others_rewritten(shards, capsys):
    (shards / "shard-000002.tar").write_bytes(b"\x00garbage" * 10)
    code, out, err = _cmd(capsys, "data", "index-shards", str(shards))
    assert code == 1 and "shard-000002.tar: not a readable tar" in err
    assert "shard-000000.idx: 4 samples" in out and json.loads((shards / "manifest.json").read_text())
