"""Issue 23 item 3: one input boundary for every command. Errors caused by input (files, folders, the disk,
arguments) end as one line naming the thing, exit 2, no traceback; a bug keeps its traceback and says so."""
import errno
import os
import subprocess
import sys

import pytest

from hvpmtl.cli import BUG, guarded, input_error, main, shown
from hvpmtl.data.tools.synthetic import write_synthetic
from hvpmtl.eval.export import ExportError, check_out, write_export


def _cmd(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize("argv", [["data", "make-synthetic", "--out", "x", "--num-images", "-5"],
                                  ["data", "index", "--list", "x.txt", "--threads", "-1"],
                                  ["data", "to-shards", "--list", "a", "--root", "b", "--out", "c", "--shard-size", "0"],
                                  ["data", "validate", "--shards", "x", "--workers", "0"]])
def test_bad_numbers_are_usage_errors(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "is below" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_os_errors_are_one_line_naming_the_file(tmp_path, capsys):
    def boom(_):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt"))
    assert guarded(boom)(None) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "ckpt") in err and "disk is full" in err


def test_a_bug_keeps_its_traceback_and_says_so(capsys):
    def bug(_):
        raise ZeroDivisionError("x")
    assert guarded(bug)(None) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and BUG in err


def test_undecodable_file_is_named(tmp_path, capsys):
    d = tmp_path / "dict.txt"
    d.write_bytes("0\tn1\t-1\tcaf\xe9\n".encode("latin-1"))
    lst = tmp_path / "train.txt"
    lst.write_text("a.jpg 0:1\n")
    code, _, err = _cmd(capsys, "data", "index", "--list", str(lst), "--dictionary", str(d))
    assert code == 2 and str(d) in err and "UTF-8" in err


def test_shown_escapes_invisible_characters_and_cuts_long_paths():
    assert shown("\ufeffa.jpg") == "\\ufeffa.jpg"
    long = shown("x" * 10_000_000)
    assert len(long) < 400 and "characters" in long


def test_output_dir_under_a_regular_file_is_one_line():
    e = None
    try:
        os.makedirs("/etc/hostname/run")
    except OSError as err:
        e = err
    assert input_error(e).startswith("/etc/hostname/run") and "regular file" in input_error(e)


def test_export_out_refused_before_reading(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ExportError, match="is a folder"):
        check_out(tmp_path / "d.safetensors")
    with pytest.raises(ExportError, match="regular file"):
        check_out(tmp_path / "f" / "b.safetensors")


def test_export_cli_refuses_out_before_the_checkpoint_is_read(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    # the run folder does not exist: reading it would be a different error, so the --out check came first
    code, _, err = _cmd(capsys, "export", "--run-dir", str(tmp_path / "no-run"), "--out",
                        str(tmp_path / "f" / "b.safetensors"))
    assert code == 2 and "regular file" in err and "no-run" not in err


def test_export_writes_by_rename_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import torch
    state = {"w": torch.ones(2)}
    info = {"timm_model": "vit_tiny_patch16_224", "img_size": 32}
    out = write_export(state, tmp_path / "b.safetensors", "timm", info)
    assert out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]

    import safetensors.torch as st

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(OSError):
        write_export(state, tmp_path / "c.safetensors", "timm", info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]


def test_index_where_it_cannot_be_written_is_one_line(tmp_path, capsys):
    """/sys refuses new files even to root (a real PermissionError, as beside a read-only list)."""
    syn = tmp_path / "syn"
    write_synthetic(syn, 4)
    code, _, err = _cmd(capsys, "data", "index", "--list", str(syn / "train.txt"), "--out", "/sys/x.hvpidx")
    assert code == 2 and "/sys" in err and "ermission" in err
