"""`hvpmtl eval linear-probe|knn` on a run, an exported file, a random init and an ImageFolder."""
import json

import pytest

from hvpmtl.cli import main as hvpmtl_main
from hvpmtl.config import load_config
from hvpmtl.eval.export import export_run


def _eval(capsys, *argv):
    code = hvpmtl_main(["eval", *argv])
    out = capsys.readouterr()
    return code, (json.loads(out.out.strip().splitlines()[-1]) if code == 0 else out.err)


def test_offline_probe_of_a_run_reproduces_the_online_numbers(pretrain_run, capsys, tmp_path):
    run = str(pretrain_run["dir"])
    online = [m for m in pretrain_run["metrics"] if "eval/linear_map" in m][-1]
    code, lp = _eval(capsys, "linear-probe", "--run-dir", run, "--out", str(tmp_path / "lp.json"))
    assert code == 0 and lp["metric"] == "map" and (lp["n_train"], lp["n_test"]) == (12, 12)
    # the step-2 checkpoint holds the teacher the engine evaluated at step 2, on the same split
    assert lp["value"] == pytest.approx(online["eval/linear_map"], abs=1e-3)
    assert json.loads((tmp_path / "lp.json").read_text()) == lp
    code, kn = _eval(capsys, "knn", "--run-dir", run)
    assert code == 0 and kn["value"] == pytest.approx(online["eval/knn_map"], abs=1e-4)
    # the exported file gives the same numbers as the run it came from
    f = export_run(run, tmp_path / "bb.safetensors")
    code, kf = _eval(capsys, "knn", "--backbone", str(f), "--config", f"{run}/config.yaml")
    assert code == 0 and kf["value"] == pytest.approx(kn["value"], abs=1e-6)
    code, rnd = _eval(capsys, "knn", "--run-dir", run, "--random-init")
    assert code == 0 and rnd["backbone"] == "random-init vit_tiny_patch16_224"


def test_single_label_imagefolder_gives_top1(shapes, capsys):
    code, r = _eval(capsys, "linear-probe", "--random-init", "--backbone-name", "vit_tiny_patch16_224",
                    "--img-size", "32", "--train-dir", str(shapes["train"]), "--test-dir", str(shapes["val"]),
                    "--set", "data.device=cpu")
    assert code == 0 and r["metric"] == "top1" and (r["n_train"], r["n_test"]) == (24, 12)
    # three shapes in three colours: even random-init features carry the colour; chance is 33%
    assert r["value"] >= 2 * 100 / 3
    # and the number is the probe's on the two folders' features, in class-folder order
    import torch

    from hvpmtl.eval.features import load_backbone, split_features
    from hvpmtl.eval.linear_probe import linear_probe

    cfg = load_config(None, ["data.device=cpu"])
    bb = load_backbone(random_init=True, backbone_name="vit_tiny_patch16_224", img_size=32, seed=0)
    f = split_features(bb, cfg.data, device=torch.device("cpu"), train_dir=str(shapes["train"]),
                       test_dir=str(shapes["val"]))
    ref = linear_probe(f["train"]["features"], f["train"]["labels"], f["test"]["features"], f["test"]["labels"],
                       multilabel=False, num_classes=3)
    assert r["value"] == pytest.approx(ref["top1"])


@pytest.mark.parametrize("argv,msg", [
    ([], "give --run-dir, --backbone, or --random-init"),
    (["--run-dir", "a", "--backbone", "b"], "one of --run-dir and --backbone"),
    (["--backbone", "/nonexistent.safetensors"], "does not exist"),
    (["--random-init", "--backbone-name", "vit_tiny_patch16_224"], "image size"),
])
def test_bad_arguments_exit_2_with_a_reason(capsys, argv, msg):
    code, err = _eval(capsys, "knn", *argv)
    assert code == 2 and msg in err


def test_eval_reports_progress_while_it_works(shapes, capsys):
    """Issue 13.5: a 20-30 s evaluation printed nothing until its result."""
    code = hvpmtl_main(["eval", "linear-probe", "--random-init", "--backbone-name", "vit_tiny_patch16_224",
                        "--img-size", "32", "--train-dir", str(shapes["train"]), "--test-dir", str(shapes["val"]),
                        "--set", "data.device=cpu"])
    err = capsys.readouterr().err
    assert code == 0
    for said in ("hvpmtl eval: fitting on 24 images, scoring 12", "hvpmtl eval: linear probe: weight decay",
                 "(1/", "hvpmtl eval: linear probe: final fit with weight decay"):
        assert said in err, err
