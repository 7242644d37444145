"""hvpmtl.fileio: an atomic write leaves the old file or the new one (an error half-way leaves the old one and no
temporary file), an exclusive create happens once, and the SHA-256 of a file is hashlib's of its bytes."""
import hashlib
import os

import pytest

from hvpmtl.fileio import atomic_file, atomic_write, create_exclusive, sha256_file


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    held = open(path)  # a reader that has the old file open keeps reading the old content
    atomic_write(path, '{"new": 1}')
    assert path.read_text() == '{"new": 1}' and held.read() == "old"
    held.close()
    atomic_write(path, b"\x00\x01", mtime_ns=1_000_000_000_000_000_000)
    assert path.read_bytes() == b"\x00\x01" and path.stat().st_mtime_ns == 1_000_000_000_000_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_an_error_half_way_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "index.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_file(path, ".index.bin.tmp-mine", mode=0o600) as f:
            f.write(b"new, but not all of it")
            assert (tmp_path / ".index.bin.tmp-mine").exists()
            raise RuntimeError("half-way")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["index.bin"]
    with atomic_file(path, mode=0o600) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o600


def test_an_exclusive_create_happens_once(tmp_path):
    path = tmp_path / "x.lock"
    assert create_exclusive(path, "first") is True
    assert create_exclusive(path, "second") is False
    assert path.read_text() == "first"
    with pytest.raises(FileNotFoundError):
        create_exclusive(tmp_path / "no-such-folder" / "x.lock")


def test_sha256_of_a_file_is_that_of_its_bytes(tmp_path):
    data = os.urandom(3 << 20) + b"tail"
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "f", fsync=True) == hashlib.sha256(data).hexdigest()
    (tmp_path / "e").write_bytes(b"")
    assert sha256_file(tmp_path / "e") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
