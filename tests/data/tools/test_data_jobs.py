"""The offline commands at scale: processes, resumable after a kill, split in parts with a merge."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import hvpmtl.data.tools.to_shards as shards_mod
import hvpmtl.data.tools.validate as validate_mod
from hvpmtl.cli import main as cli_main
from hvpmtl.data.formats.index_file import DataIndex
from hvpmtl.data.formats.index_format import default_index_path
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.tools.jobs import parse_part, part_units


def test_parts_cover_the_work_once():
    for count in (0, 1, 7, 100):
        for n in (1, 3, 8):
            got = [u for i in range(n) for u in part_units(count, (i, n))]
            assert got == list(range(count))
    assert parse_part("2/8") == (2, 8)
    for bad in ("8/8", "-1/2", "x", "1/0"):
        with pytest.raises(DataError, match="expected i/N"):
            parse_part(bad)


def _tree(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def small(syn, tmp_path):
    """A copy of the synthetic set, so that its index and work files are this test's own."""
    root = tmp_path / "syn"
    shutil.copytree(syn["root"], root, ignore=shutil.ignore_patterns("*.hvpidx*", "shards"))
    return root


@pytest.mark.slow
def test_validate_in_worker_processes(small, monkeypatch):
    monkeypatch.setattr(validate_mod, "CHUNK", 8)  # 40 samples: 5 chunks
    monkeypatch.setattr(validate_mod, "SMALL", 0)  # in worker processes even for this little work
    lst, root = str(small / "train.txt"), str(small)
    calls = []
    real = validate_mod.jpeg.check_file
    monkeypatch.setattr(validate_mod.jpeg, "check_file", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    rep = validate_mod.validate_list(lst, root, num_classes=24, workers=2)
    assert rep.errors == [] and rep.num_samples == 40
    assert calls == []  # the checks ran in the 2 worker processes, not here
    assert (np.array(DataIndex(default_index_path(lst)).verdict) == 1).all()


def test_validate_parts_merge_and_cache(small, monkeypatch):
    monkeypatch.setattr(validate_mod, "CHUNK", 8)  # 40 samples: 5 chunks
    lst, root = str(small / "train.txt"), str(small)
    calls = []
    real = validate_mod.jpeg.check_file
    monkeypatch.setattr(validate_mod.jpeg, "check_file", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    verdicts = np.ones(40, np.uint8)
    # parts on "machines" (here one after the other, inline), then a merge that checks nothing
    for i in range(3):
        rep = validate_mod.validate_list(lst, root, num_classes=24, part=(i, 3))
        assert rep.num_samples in (8, 16)
    assert not DataIndex(default_index_path(lst)).verdict.any()  # parts do not write the index
    n_checked = len(calls)
    assert n_checked == 40
    rep = validate_mod.validate_list(lst, root, num_classes=24, merge_only=True)
    assert len(calls) == n_checked and rep.num_samples == 40
    assert np.array_equal(DataIndex(default_index_path(lst)).verdict, verdicts)
    # a re-run re-checks only the files whose size or mtime changed
    img = small / "train/000/0000007.jpg"
    img.write_bytes(img.read_bytes()[:300])
    rep = validate_mod.validate_list(lst, root, num_classes=24)
    assert len(calls) == n_checked + 1 and [(i.code, i.line) for i in rep.errors] == [("truncated", 8)]
    # a merge with a part missing says which
    os.remove(next(Path(str(default_index_path(lst)) + ".work").glob("list-000000000016-*.npz")))
    with pytest.raises(DataError, match="1 of 5 chunks .* not checked yet \\(first: samples 16-24\\)"):
        validate_mod.validate_list(lst, root, num_classes=24, merge_only=True)


BASE = ["data", "to-shards", "--shard-size", "6", "--num-classes", "24"]


@pytest.mark.slow
def test_to_shards_in_worker_processes(small, tmp_path, monkeypatch):
    base = BASE + ["--list", str(small / "train.txt"), "--root", str(small)]
    assert cli_main(base + ["--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    monkeypatch.setattr(shards_mod, "SMALL", 0)
    assert cli_main(base + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one")  # byte-identical shards, manifest and record


def test_to_shards_parts_and_resume(small, tmp_path):
    base = BASE + ["--list", str(small / "train.txt"), "--root", str(small)]
    assert cli_main(base + ["--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    one = _tree(tmp_path / "one")
    assert len([k for k in one if k.endswith(".tar")]) == 7
    # three parts (a Slurm array), then the merge
    out = tmp_path / "parts"
    for i in range(3):
        assert cli_main(base + ["--out", str(out), "--part", f"{i}/3"]) == 0
        assert not (out / "manifest.json").exists()
    assert cli_main(base + ["--out", str(out), "--merge"]) == 0
    assert _tree(out) == one and not (out / ".work").exists()
    # a kill after some shards: the re-run writes only the rest
    out = tmp_path / "killed"
    assert cli_main(base + ["--out", str(out), "--part", "0/2"]) == 0
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert 0 < len(done) < 7
    assert cli_main(base + ["--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in done} == done
    assert _tree(out) == one
    assert default_index_path(out).exists()
    # a resume with other settings is refused, naming the folder
    other = ["data", "to-shards", "--shard-size", "5", "--list", str(small / "train.txt"), "--root", str(small)]
    assert cli_main(other + ["--out", str(tmp_path / "other"), "--part", "0/2"]) == 0
    assert cli_main(base + ["--out", str(tmp_path / "other")]) == 2
