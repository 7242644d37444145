"""hvpmtl.checkpoint.weights: reading a run's backbone for export, and exported backbone files for evaluation and
fine-tuning; files with a payload are refused and run nothing."""
import numpy as np
import pytest
import torch

from hvpmtl import checkpoint as ck
from hvpmtl.config import load_config
from tests.checkpoint.tagged_run import Payload, plant, reseal


def test_export_of_a_run_with_a_payload_exits_2_and_runs_nothing(copy, tmp_path, capsys):
    from hvpmtl.cli import main as hvpmtl_main

    marker = tmp_path / "pwned"
    tag = copy / "checkpoints" / ck.tag_for(6)
    plant(tag / "mp_rank_00_model_states.pt", marker)
    reseal(tag)
    assert hvpmtl_main(["export", "--run-dir", str(copy), "--checkpoint", ck.tag_for(6),
                        "--out", str(tmp_path / "bb.safetensors")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "bb.safetensors").exists()


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_backbone_files_with_a_payload_are_refused_by_eval_and_fine_tuning(tmp_path, capsys, suffix):
    import pickle

    from hvpmtl.cli import main as hvpmtl_main
    from hvpmtl.config import ConfigError, FinetuneConfig
    from hvpmtl.train.tasks.classification import build_model

    marker = tmp_path / "pwned"
    bad = tmp_path / f"x{suffix}"
    obj = {"model": {"blocks.0.norm1.weight": np.ones(3, np.float32)}, "hvpmtl": {"prefix": ""},
           "x": Payload(marker)}
    if suffix == ".pkl":
        bad.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, bad)
    assert hvpmtl_main(["eval", "knn", "--backbone", str(bad), "--backbone-name", "vit_tiny_patch16_224",
                        "--img-size", "32"]) == 2
    assert "refused to load" in capsys.readouterr().err
    cfg = load_config("configs/finetune_tiny.yaml", [f"data.train_dir={tmp_path}", f"data.val_dir={tmp_path}",
                                                     f"model.init={bad}"], schema=FinetuneConfig)
    with pytest.raises(ConfigError, match="model.init: .*refused to load"):
        build_model(cfg, 3)
    assert not marker.exists()
    # the same files without the payload are read (numpy arrays in a .pkl, tensors in a .pth)
    del obj["x"]
    if suffix == ".pkl":
        bad.write_bytes(pickle.dumps(obj))
    else:
        obj["model"] = {k: torch.from_numpy(v) for k, v in obj["model"].items()}
        torch.save(obj, bad)
    state, meta = ck.read_backbone_file(bad)
    assert state["blocks.0.norm1.weight"].tolist() == [1.0, 1.0, 1.0]
