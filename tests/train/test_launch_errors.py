"""Issue 10.10: data that cannot train is a message and exit 2, found before DeepSpeed or the model is set up;
config errors likewise (in-process: launchers/pretrain.py runs this `main`)."""
import pytest

import hvpmtl.train.pretrain as pretrain
from hvpmtl.data.tools.synthetic import make_synthetic
from hvpmtl.data.tools.validate import validate_list


@pytest.fixture
def never_built(monkeypatch):
    """Records any attempt to build the model or the DeepSpeed engine."""
    import deepspeed

    built = []

    def refuse(what):
        def f(*a, **k):
            built.append(what)
            raise AssertionError(f"{what} was set up before the data was checked")
        return f
    monkeypatch.setattr(pretrain, "HVPMetaArch", refuse("model"))
    monkeypatch.setattr(deepspeed, "initialize", refuse("deepspeed engine"))
    return built


def _main(tmp_path, syn, *more):
    return pretrain.main(["--config", "configs/test_tiny.yaml", "--resume", "none",
                          "--set", f"run.output_dir={tmp_path / 'run'}", "--set", "tracking.enabled=false",
                          "--set", "data.format=tencent", "--set", f"data.root={syn['root']}",
                          "--set", f"data.list_file={syn['list_file']}", "--set", "data.num_classes=24",
                          "--set", "data.device=cpu", *more])


def test_fewer_samples_than_one_global_batch(tmp_path, capsys, never_built):
    syn = make_synthetic(tmp_path / "few", 3, seed=0)  # 3 images, micro batch 4
    assert _main(tmp_path, syn) == 2
    err = capsys.readouterr().err
    assert err.startswith("hvpmtl: data error:") and "batch of 4" in err and "Traceback" not in err
    assert never_built == []


def test_unreadable_image_without_a_skip_list(tmp_path, capsys, never_built):
    syn = make_synthetic(tmp_path / "bad", 8, seed=0)
    first = open(syn["list_file"]).readline().split()[0]
    (tmp_path / "bad" / first).write_bytes(b"")  # a zero-byte JPEG
    # start-up opens no image (issue 9.1): a bad image is known before the model once the validator has recorded
    # it in the data index (unvalidated, it is an exit-2 DataError naming file:line when read)
    validate_list(syn["list_file"], syn["root"])
    assert _main(tmp_path, syn) == 2
    err = capsys.readouterr().err
    assert err.startswith("hvpmtl: data error:") and "Traceback" not in err
    assert "train.txt:1" in err  # names the list file and the line
    assert never_built == []


def test_config_error_exits_2_with_the_key(tmp_path, capsys, never_built):
    syn = {"root": str(tmp_path), "list_file": str(tmp_path / "x.txt")}
    assert _main(tmp_path, syn, "--set", "run.log_every=0") == 2
    err = capsys.readouterr().err
    assert "hvpmtl: config error:" in err and "'run.log_every' must be >= 1" in err
    assert never_built == []
