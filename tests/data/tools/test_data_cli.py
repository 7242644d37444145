"""`hvpmtl data`: every option explained with its default, the skip-list options named for what they
do, an ImageFolder the fine-tuning example can use, progress on long commands."""
import argparse
from pathlib import Path

import pytest

from hvpmtl.cli import build_parser
from hvpmtl.cli import main as cli_main
from hvpmtl.data.loaders.imagefolder import build_imagefolder_loader
from hvpmtl.data.tools.validate import read_skip_list


def _data_commands():
    parser = build_parser()
    group = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["data"]
    return next(a for a in group._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_has_help_and_shows_its_default():
    commands = _data_commands()
    assert {"make-synthetic", "index", "validate", "to-shards", "index-shards"} <= set(commands)
    for name, p in commands.items():
        assert isinstance(p.formatter_class, type) and issubclass(p.formatter_class,
                                                                  argparse.ArgumentDefaultsHelpFormatter), name
        fmt = p._get_formatter()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), f"{name} {a.option_strings or a.dest}: no help"
            if a.option_strings and not a.required:
                assert "%(default)" in fmt._get_help_string(a), f"{name} {a.option_strings}: no default shown"
    assert "(default: 1000)" in commands["to-shards"].format_help()


def test_skip_list_options_say_what_they_do(syn, tmp_path, capsys):
    skip = tmp_path / "skip.txt"
    lst, root = syn["list_file"], syn["root"]
    assert cli_main(["data", "validate", "--list", lst, "--root", root, "--write-skip-list", str(skip)]) == 0
    assert read_skip_list(str(skip)) == {}
    assert "note:" not in capsys.readouterr().err
    old = tmp_path / "old.txt"
    assert cli_main(["data", "validate", "--list", lst, "--root", root, "--skip-list", str(old)]) == 0
    assert old.exists() and "now --write-skip-list" in capsys.readouterr().err
    out = tmp_path / "shards"
    assert cli_main(["data", "to-shards", "--list", lst, "--root", root, "--out", str(out), "--read-skip-list",
                     str(skip), "--shard-size", "20", "--num-classes", "24"]) == 0
    assert cli_main(["data", "to-shards", "--list", lst, "--root", root, "--out", str(tmp_path / "s2"),
                     "--skip-list", str(skip), "--shard-size", "20", "--num-classes", "24"]) == 0
    assert "now --read-skip-list" in capsys.readouterr().err


def test_index_command_and_progress(syn, tmp_path, capsys):
    out = tmp_path / "x.hvpidx"
    assert cli_main(["data", "index", "--list", syn["list_file"], "--num-classes", "24", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{out}: 40 samples" in text and "lines/s" in text
    assert cli_main(["data", "index", "--list", str(tmp_path / "none.txt")]) == 2
    assert "cannot read list file" in capsys.readouterr().err


def test_index_show_says_what_the_index_holds_and_whether_it_is_fresh(syn, tmp_path, capsys):
    lst = tmp_path / "train.txt"
    lst.write_bytes(Path(syn["list_file"]).read_bytes())
    assert cli_main(["data", "index", "--list", str(lst), "--num-classes", "24"]) == 0
    capsys.readouterr()
    index = f"{lst}.hvpidx"
    assert cli_main(["data", "index", "--show", index]) == 0
    text = capsys.readouterr().out
    for want in (f"{index}\n", "format       hvpmtl-data-index-v2", f"kind         list, built from {lst}",
                 "samples      40 (of 40 lines)", "verdicts     unchecked 40 (no validator run yet)",
                 "issues       0", "fresh        yes"):
        assert want in text, (want, text)
    assert cli_main(["data", "validate", "--list", str(lst), "--root", syn["root"], "--num-classes", "24"]) == 0
    with open(lst, "a") as f:
        f.write("new.jpg\t1:1\n")
    capsys.readouterr()
    assert cli_main(["data", "index", "--list", str(lst), "--show"]) == 0  # the index beside the list
    text = capsys.readouterr().out
    assert "verdicts     ok 40 (by validate, root" in text and "fresh        no: " in text and "has changed" in text
    assert cli_main(["data", "index", "--show"]) == 2
    assert "name the index" in capsys.readouterr().err
    assert cli_main(["data", "index", "--show", str(lst)]) == 2  # the list itself: one line, no traceback
    assert "not an hvpmtl data index" in capsys.readouterr().err


def test_make_synthetic_imagefolder_feeds_the_imagefolder_loader(tmp_path, capsys):
    d = tmp_path / "d"
    assert cli_main(["data", "make-synthetic", "--out", str(d), "--num-images", "24", "--holdout", "20",
                     "--imagefolder", "--imagefolder-train", "36"]) == 0
    out = capsys.readouterr().out
    assert f"--set data.train_dir={d / 'imagefolder' / 'train'}" in out
    train = build_imagefolder_loader(str(d / "imagefolder" / "train"), 4, 32, train=True, device="cpu",
                                     num_threads=1)
    val = build_imagefolder_loader(str(d / "imagefolder" / "val"), 4, 32, train=False, device="cpu", num_threads=1)
    classes = sorted(f"{c}-{t}" for c in ("red", "orange", "yellow", "blue", "green", "purple")
                     for t in ("plain", "striped", "dotted"))
    # every class in both splits (classes go round in turn), balanced: 36 = 2 per class
    assert train.classes == classes and val.classes == classes and train.num_samples == 36
    assert val.num_samples == 20
    assert all(len(list((d / "imagefolder" / "train" / c).iterdir())) == 2 for c in classes)
    b = next(iter(train))
    assert b["image"].shape == (4, 3, 32, 32)
    with pytest.raises(SystemExit):
        cli_main(["data", "make-synthetic", "--out", str(tmp_path / "e")])
    assert cli_main(["data", "make-synthetic", "--out", str(tmp_path / "e"), "--num-images", "2",
                     "--imagefolder"]) == 2
    assert "needs --holdout" in capsys.readouterr().err
    assert Path(d / "imagefolder" / "train").is_dir()


def test_long_commands_report_progress(tmp_path, capsys, monkeypatch):
    import hvpmtl.data.tools.jobs as jobs
    orig = jobs.Progress.__init__

    def every_step(self, *a, **k):
        k["every"] = 0.0
        orig(self, *a, **k)
    monkeypatch.setattr(jobs.Progress, "__init__", every_step)
    assert cli_main(["data", "make-synthetic", "--out", str(tmp_path / "p"), "--num-images", "3"]) == 0
    err = capsys.readouterr().err
    assert "make-synthetic train: 3/3 images (100.0%)" in err
    assert cli_main(["data", "validate", "--list", str(tmp_path / "p/train.txt"), "--root", str(tmp_path / "p")]) == 0
    assert "validate train.txt: 3/3 samples (100.0%)" in capsys.readouterr().err
