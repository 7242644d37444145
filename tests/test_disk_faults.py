"""Issue 23: full and read-only disks, for real. A small tmpfs mounted for the test gives the kernel's own ENOSPC
(no error raised by hand), a tmpfs remounted read-only a folder even root cannot write (EROFS: chmod does not stop
root). Through the real commands: the launcher saving a checkpoint on a full disk, `hvpmtl export --out` on a
folder, under a regular file, in a read-only folder and on a full disk, and `hvpmtl data index` beside a list in a
read-only folder. Each is one line naming the thing, exit 2, no traceback, nothing half-written taken as good.

Mounting needs root (CAP_SYS_ADMIN), as the cluster tests do: without it the read-only cases use a folder without
write permission and the full-disk cases fail saying why (never skipped: a skip would hide that nothing was checked)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from subprocs import subprocess_env

from hvpmtl.checkpoint import candidates, check_presence, read_manifest

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096


# ----------------------------------------------------------------------------- real small and read-only disks

class Mounts:
    """tmpfs mounts made by a test, unmounted at its end."""

    def __init__(self):
        self.points: list[Path] = []

    def tmpfs(self, point: Path, size: int, *, read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            raise AssertionError("the full-disk tests mount a small tmpfs, which needs root: run them as root")
        point.mkdir(parents=True, exist_ok=True)
        size = -(-size // PAGE) * PAGE
        opts = f"size={size}" + (",ro" if read_only else "")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "hvpmtl-test", str(point)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            raise AssertionError(f"cannot mount a tmpfs for the full-disk tests: {p.stderr.strip()}")
        self.points.append(point)
        return point

    def remount(self, point: Path, opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(point)], check=True, capture_output=True)

    def unmount_all(self) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def mounts():
    m = Mounts()
    yield m
    m.unmount_all()


def _read_only_folder(mounts: Mounts, point: Path, files: dict[str, str] | None = None) -> Path:
    """A folder nobody can create files in, holding `files`: a tmpfs remounted read-only (root), else a folder
    without write permission."""
    if os.geteuid() == 0:
        mounts.tmpfs(point, 1 << 20)
    else:
        point.mkdir(parents=True)
    for name, text in (files or {}).items():
        (point / name).write_text(text)
    if os.geteuid() == 0:
        mounts.remount(point, "ro")
    else:
        point.chmod(0o555)
    with pytest.raises(OSError):
        (point / ".probe").write_text("x")  # really unwritable
    return point


def _used(folder: Path) -> int:
    """What `folder`'s files take on a tmpfs: whole pages."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in folder.rglob("*") if p.is_file())


def _run(cmd, timeout=420):
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _pretrain(out, *more):
    return _run([sys.executable, "launchers/pretrain.py", "--config", "configs/test_tiny.yaml", "--resume", "auto",
                 "--set", f"run.output_dir={out}", "--set", "run.checkpoint_every=2",
                 "--set", "tracking.enabled=false", *more])


def _problem_lines(err: str) -> list[str]:
    """The error lines (`hvpmtl: ...`, `hvpmtl export: ...`), not export's progress lines."""
    return [x for x in err.splitlines() if x.startswith("hvpmtl")
            and not x.startswith(("hvpmtl export: reading ", "hvpmtl export: using the "))]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """test_tiny trained 2 steps: one checkpoint, step_00000002."""
    out = tmp_path_factory.mktemp("disk") / "run"
    code, o, e = _pretrain(out, "--set", "optim.max_steps=2")
    assert code == 0, (o + e)[-3000:]
    return out


# ----------------------------------------------------------------------------- a checkpoint save on a full disk

@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_stops_with_one_line_and_the_previous_tag_stays_latest(
        two_steps, tmp_path, mounts):
    tag_size = _used(two_steps / "checkpoints/step_00000002")
    # room for the run as it is and half of the next checkpoint: the save of step 4 runs out of space
    disk = mounts.tmpfs(tmp_path / "disk", _used(two_steps) + tag_size // 2 + (1 << 20))
    out = disk / "run"
    shutil.copytree(two_steps, out, ignore=shutil.ignore_patterns(".hvpmtl.lock*"))
    run_id = read_manifest(out / "checkpoints/step_00000002")["run_id"]

    code, o, e = _pretrain(out, "--set", "optim.max_steps=4")
    assert code == 2, (o + e)[-3000:]
    assert "Traceback" not in o + e and "internal error" not in e
    lines = _problem_lines(e)
    assert len(lines) == 1, e[-3000:]
    assert "No space left on device (the disk is full: free space or point the output elsewhere)" in lines[0]
    assert str(out / "checkpoints") in lines[0]  # names the file it could not write
    # nothing half-written is taken as good: the previous checkpoint stays `latest` and complete
    assert (out / "checkpoints/latest").read_text().strip() == "step_00000002"
    half = out / "checkpoints/step_00000004"
    assert not (half / "COMPLETE").exists()
    assert [t.name for t in candidates(out / "checkpoints")] == ["step_00000002"]
    assert not check_presence(out / "checkpoints/step_00000002", read_manifest(out / "checkpoints/step_00000002"))

    # space freed: `--resume auto` loads step 2 (the half tag passed over), trains 3 and 4, saves 4, same run
    mounts.remount(disk, f"size={_used(two_steps) + 3 * tag_size + (1 << 20)}")
    code, o, e = _pretrain(out, "--set", "optim.max_steps=4")
    assert code == 0, (o + e)[-3000:]
    assert "Traceback" not in o + e
    assert (out / "checkpoints/latest").read_text().strip() == "step_00000004"
    assert read_manifest(out / "checkpoints/step_00000004")["run_id"] == run_id
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "lr" in json.loads(x)]
    assert steps[-2:] == [3, 4] and steps[:2] == [1, 2]


# ----------------------------------------------------------------------------- hvpmtl export --out

def _export(run_dir, out, *more):
    return _run([sys.executable, "-m", "hvpmtl", "export", "--run-dir", str(run_dir), "--out", str(out), *more])


def _refused_before_reading(code, o, e) -> str:
    assert code == 2, (o + e)[-3000:]
    assert "Traceback" not in o + e
    assert "hvpmtl export: reading" not in e  # refused before the checkpoint was read
    lines = _problem_lines(e)
    assert len(lines) == 1, e
    return lines[0]


@pytest.mark.slow
def test_export_out_a_folder_or_under_a_regular_file_is_refused_through_the_command(two_steps, tmp_path):
    folder = tmp_path / "backbone.safetensors"
    folder.mkdir()
    line = _refused_before_reading(*_export(two_steps, folder))
    assert f"--out {folder}: is a folder; name the file to write" in line
    assert list(folder.iterdir()) == []  # nothing written into it

    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    for out in (regular / "b.safetensors", regular / "sub" / "b.safetensors"):
        line = _refused_before_reading(*_export(two_steps, out))
        assert f"a part of {out.parent} is a regular file, not a folder" in line
    assert regular.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.safetensors", "notes.txt"]


@pytest.mark.slow
def test_export_out_in_a_folder_it_cannot_write_is_refused_through_the_command(two_steps, tmp_path, mounts):
    ro = _read_only_folder(mounts, tmp_path / "ro")
    line = _refused_before_reading(*_export(two_steps, ro / "b.safetensors"))
    assert f"cannot write in {ro}" in line
    line = _refused_before_reading(*_export(two_steps, ro / "new" / "b.safetensors"))
    assert f"cannot create the folder {ro / 'new'}" in line
    assert list(ro.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name,more", [("b.safetensors", ()), ("b.pth", ("--format", "mmdet")), ("b.pkl", ())])
def test_export_on_a_full_disk_leaves_nothing_behind(two_steps, tmp_path, mounts, name, more):
    """The --out check passes (the folder is writable), the write itself runs out of space: one line naming the
    file, exit 2, and neither the file nor its temporary is left."""
    disk = mounts.tmpfs(tmp_path / "disk", 64 * 1024)
    code, o, e = _export(two_steps, disk / name, *more)
    assert code == 2, (o + e)[-3000:]
    assert "Traceback" not in o + e and "internal error" not in e
    lines = _problem_lines(e)
    assert len(lines) == 1 and "hvpmtl export: using the" in e, e[-3000:]  # read the checkpoint, then failed
    assert f"{disk / name}: No space left on device (the disk is full" in lines[0]
    assert list(disk.iterdir()) == []


# ----------------------------------------------------------------------------- hvpmtl data index beside a read-only list

@pytest.mark.slow
def test_data_index_beside_a_list_in_a_read_only_folder_names_the_folder_and_out(tmp_path, mounts):
    listing = "a.jpg\t0:1\nb.jpg\t1:1\n"
    ro = _read_only_folder(mounts, tmp_path / "lists", {"train.txt": listing})
    code, o, e = _run([sys.executable, "-m", "hvpmtl", "data", "index", "--list", str(ro / "train.txt")])
    assert code == 2, o + e
    assert "Traceback" not in o + e
    lines = _problem_lines(e)
    assert len(lines) == 1, e
    assert str(ro) in lines[0] and "--out" in lines[0] and "data.index" in lines[0]
    assert sorted(p.name for p in ro.iterdir()) == ["train.txt"]
    # what the line says works: the index written elsewhere
    index = tmp_path / "train.hvpidx"
    code, o, e = _run([sys.executable, "-m", "hvpmtl", "data", "index", "--list", str(ro / "train.txt"),
                       "--out", str(index)])
    assert code == 0, o + e
    assert index.is_file() and "Traceback" not in o + e
