"""benchmarks/results_table.py: the aggregation over seeds (mean ± std, differences and their noise, collapse
figures read from whatever metrics.jsonl holds) by hand-made cases, and its plumbing end to end at the
smallest budget (pre-training, probes, fine-tuning of both initialisations, resuming, refusing another budget)."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results_table as rt  # noqa: E402


def _probe(lin, knn=50.0, final=None):
    r = {"linear_map": lin, "knn_map": knn, "groups": {"shape": lin, "colour": lin, "texture": lin, "crowded": lin}}
    if final is not None:
        r["final"] = final
    return r


def test_tables_report_mean_std_over_seeds_and_differences_with_their_noise():
    results = {"probe": {rt.RANDOM: {"0": _probe(60.0), "1": _probe(62.0), "2": _probe(64.0)},
                         rt.FULL: {"0": _probe(70.0, final={"swav": 4.0, "swav/ln_k": 0.96, "swav/code_entropy": 0.5}),
                                   "1": _probe(72.0, final={"swav": 3.0, "swav/ln_k": 0.72, "swav/code_entropy": 0.7}),
                                   "2": _probe(74.0, final={"swav": 2.0, "swav/ln_k": 0.48, "swav/code_entropy": 0.9})},
                         "no SwAV": {"0": _probe(71.0, final={"asl": 1.0}), "1": _probe(72.0, final={"asl": 1.0})}},
               "finetune": {rt.RANDOM: {str(i): {"top1": t, "top1_per_epoch": [f, t]}
                                        for i, (f, t) in enumerate([(10.0, 20.0), (12.0, 30.0), (14.0, 40.0)])},
                            rt.FULL: {str(i): {"top1": t, "top1_per_epoch": [f, 0.0, t]}
                                      for i, (f, t) in enumerate([(30.0, 50.0), (32.0, 60.0), (34.0, 70.0)])}},
               "finetune_scenes": {rt.RANDOM: {str(i): {"mAP": t, "mAP_per_epoch": [f, t]}
                                               for i, (f, t) in enumerate([(50.0, 60.0), (52.0, 62.0), (54.0, 64.0)])},
                                   rt.FULL: {str(i): {"mAP": t, "mAP_per_epoch": [f, t]}
                                             for i, (f, t) in enumerate([(55.0, 66.0), (56.0, 67.0), (57.0, 68.0)])},
                                   "no ASL": {str(i): {"mAP": 63.0, "mAP_per_epoch": [f, 63.0]}
                                              for i, f in enumerate([52.0, 53.0, 54.0])}}}
    lines = rt.tables(results).splitlines()
    row = {}
    for line in lines:  # the probe table's rows: the first of each name
        row.setdefault(line.split(" | ")[0], line)
    # mean and sample std (ddof 1): 60, 62, 64 -> 62.0 ± 2.0
    assert row["| random init"].startswith("| random init | 3 | 62.0 ± 2.0 |")
    # full - random: +10 ± hypot(2, 2) = 2.83, 3.5 of them
    assert "| 72.0 ± 2.0 | +10.0 ± 2.8 (3.5σ) |" in row["| full (4 objectives)"]
    # no SwAV (2 seeds: 71.5 ± 0.71) against full: -0.5 ± hypot(0.71, 2) = 2.1
    assert "| 71.5 ± 0.7 | +9.5 ± 2.1 (4.5σ) | -0.5 ± 2.1 (0.2σ) |" in row["| no SwAV"]
    ft = [line for line in lines if line.startswith(f"| {rt.FULL} | 3 | 60.0 ± 10.0 |")]
    # last epoch: +30 ± hypot(10, 10); first epoch: 32 ± 2 vs 12 ± 2 -> +20 ± 2.8 (7.1σ);
    # mean over epochs: full (30+0+50)/3, (32+0+60)/3, (34+0+70)/3 = 26.7, 30.7, 34.7 (± 4.0) vs random 15, 21, 27
    # (± 6.0): +9.7 ± hypot(4, 6) = 7.2 (1.3σ)
    assert ft and "+30.0 ± 14.1 (2.1σ) |  | 32.0 ± 2.0 | +20.0 ± 2.8 (7.1σ) | 30.7 ± 4.0 | +9.7 ± 7.2 (1.3σ) |" in ft[0]
    # multi-label fine-tuning, its own table in mAP: last 67 ± 1 vs 62 ± 2 -> +5 ± hypot(1, 2) = 2.24 (2.2σ);
    # first 56 ± 1 vs 52 ± 2 -> +4 ± 2.2 (1.8σ); mean over epochs 60.5, 61.5, 62.5 vs 55, 57, 59 -> +4.5 (2.0σ)
    assert any(line.startswith("| initialisation (scenes) | seeds | mAP (%), last epoch |") for line in lines)
    assert (f"| {rt.FULL} | 3 | 67.0 ± 1.0 | +5.0 ± 2.2 (2.2σ) |  | 56.0 ± 1.0 | +4.0 ± 2.2 (1.8σ) | 61.5 ± 1.0 | "
            "+4.5 ± 2.2 (2.0σ) |") in lines[lines.index(next(x for x in lines if "(scenes)" in x)) + 3]
    # a fine-tuned ablation (--ft-variants): against random init, 63 ± 0 vs 62 ± 2 -> +1.0 ± 2.0; against the
    # full model's same seeds (0-2: 67 ± 1) -> -4.0 ± 1.0 (4.0σ)
    no_asl = lines[lines.index(next(x for x in lines if "(scenes)" in x)) + 4]
    assert no_asl.startswith("| no ASL | 3 | 63.0 ± 0.0 | +1.0 ± 2.0 (0.5σ) | -4.0 ± 1.0 (4.0σ) | 53.0 ± 1.0 | "
                             "+1.0 ± 2.2 (0.4σ) |")
    # collapse figures: the keys some run logged, a dash where a variant has none
    head = next(line for line in lines if line.startswith("| variant"))
    assert head.split(" | ")[1:] == ["SwAV loss", "swav/ln_k", "swav/code_entropy |"]
    collapse = [line for line in lines if line.count(" | ") == 3 and "±" in line and "0.720" in line]
    assert collapse == [f"| {rt.FULL} | 3.000 ± 1.000 | 0.720 ± 0.240 | 0.700 ± 0.200 |"]
    assert "| no SwAV | — | — | — |" in lines


def test_final_values_average_the_last_logged_steps_and_skip_absent_keys(tmp_path):
    shutil.copy(ROOT / "configs" / "demo_cpu.yaml", tmp_path / "config.yaml")  # 64 prototypes
    rows = [{"step": i, "loss": float(i), "swav": 4.0 + i, "lr": 1e-3} for i in range(12)]
    for r in rows[-3:]:  # a figure logged only on some steps: its own last values
        r["swav/code_entropy"] = 0.5
        r["distill/teacher_entropy"] = 0.25
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    f = rt.final_values(tmp_path)
    assert f["loss"] == pytest.approx(sum(range(2, 12)) / 10)
    assert f["swav/ln_k"] == pytest.approx(f["swav"] / math.log(64))
    assert f["swav/code_entropy"] == 0.5 and f["distill/teacher_entropy"] == 0.25
    assert "lr" not in f and "step" not in f

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "asl": 1.0}) + "\n")  # no SwAV
    assert rt.final_values(tmp_path) == {"loss": 2.0, "asl": 1.0}


def test_a_table_of_another_budget_is_refused_and_another_finetuning_budget_measured_anew(tmp_path):
    f = tmp_path / "results.json"
    ft = {"ft_epochs": 3}
    rt.save(f, {"budget": {"epochs": 3, "img_size": 64}, "ft_budget": ft, "commit": rt.commit(),
                "probe": {rt.FULL: {"0": _probe(70.0)}}, "finetune": {rt.FULL: {"0": {"top1": 50.0}}}})
    same = rt.load_results(f, {"epochs": 3, "img_size": 64}, ft)
    assert same["probe"][rt.FULL]["0"]["linear_map"] == 70.0 and same["finetune"][rt.FULL]["0"]["top1"] == 50.0
    assert same["finetune_scenes"] == {}  # a table from before the multi-label rows gains them, nothing else changes
    same["finetune_scenes"] = {rt.FULL: {"0": {"mAP": 60.0}}}
    rt.save(f, same)
    with pytest.raises(SystemExit, match=r"another budget \{'img_size': \(64, 96\)\}"):
        rt.load_results(f, {"epochs": 3, "img_size": 96}, ft)
    # another fine-tuning budget: probes kept, fine-tuning results set aside (not mixed into the new ones)
    other = rt.load_results(f, {"epochs": 3, "img_size": 64}, {"ft_epochs": 20})
    assert other["probe"][rt.FULL]["0"]["linear_map"] == 70.0
    assert other["finetune"] == {} and other["finetune_scenes"] == {}
    assert other["ft_budget"] == {"ft_epochs": 20}
    assert other["finetune_earlier"] == [{"ft_budget": ft, "finetune": {rt.FULL: {"0": {"top1": 50.0}}},
                                          "finetune_scenes": {rt.FULL: {"0": {"mAP": 60.0}}}}]


@pytest.mark.slow
def test_the_table_runs_end_to_end_and_resumes_without_rerunning(tmp_path):
    cmd = [sys.executable, "benchmarks/results_table.py", "--seeds", "0", "--only", "full", "--num-images", "48",
           "--holdout", "36", "--img-size", "32", "--epochs", "1", "--steps", "2", "--ft-epochs", "1",
           "--ft-train-images", "18", "--dense-epochs", "1", "--dense-val", "8",
           "--ft-tasks", "objects", "scenes", "segmentation", "--out", str(tmp_path)]
    # as the script runs outside the tests: the losses' torch paths on the CPU, not Triton's interpreter (which
    # conftest turns on for the engine tests; it doubled each training process's time here)
    env = dict(os.environ, TRITON_INTERPRET="0")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["probe"]) == {rt.RANDOM, rt.FULL} and set(results["finetune"]) == {rt.RANDOM, rt.FULL}
    full = results["probe"][rt.FULL]["0"]
    assert 0 < full["linear_map"] <= 100 and full["final"]["swav/ln_k"] > 0 and "asl" in full["final"]
    for r in results["finetune"].values():
        assert 0 <= r["0"]["top1"] <= 100 and r["0"]["epochs"] == 1
    # the pre-trained fine-tuning started from that run's student, not from a random init
    ft_dir = tmp_path / "finetune_18img_1ep_b16"
    init = ft_dir / "full" / "init_seed0.safetensors"
    assert init.is_file() and str(init) in (ft_dir / "full" / "seed0" / "config.yaml").read_text()
    assert f"| {rt.FULL} | 1 |" in p.stdout and "top-1 (%), first epoch" in p.stdout
    # fine-tuned on the object-centric ImageFolder: 18 labelled images, one per class
    classes = sorted(x.name for x in (tmp_path / "data" / "objects_train18_val36" / "train").iterdir())
    assert len(classes) == 18 and "red-striped" in classes
    # and multi-label on 18 + 36 scenes of data seed 1, which the pre-training (seed 0) never saw
    assert set(results["finetune_scenes"]) == {rt.RANDOM, rt.FULL} and "mAP (%), first epoch" in p.stdout
    for r in results["finetune_scenes"].values():
        assert 0 < r["0"]["mAP"] <= 100 and r["0"]["epochs"] == 1
    scenes = tmp_path / "data" / "scenes_seed1_train18_val36"
    assert len((scenes / "train.txt").read_text().splitlines()) == 18
    first = "train/000/0000000.jpg"  # same name in both sets, another image
    assert (scenes / first).read_bytes() != (tmp_path / "data" / first).read_bytes()
    # and UperNet on the synthetic ADE20K (detection is the same path: one dense task is enough here)
    assert set(results["finetune_seg"]) == {rt.RANDOM, rt.FULL} and results["finetune_det"] == {}
    for r in results["finetune_seg"].values():
        assert 0 <= r["0"]["mIoU"] <= 100 and r["0"]["epochs"] == 1

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "done before" in again.stdout and "launchers/" not in again.stdout  # nothing trained again
    assert json.loads((tmp_path / "results.json").read_text()) == results

    # another fine-tuning budget: fine-tuned anew (the objects task alone: one task proves it), the pre-training
    # and its probes kept, every task's earlier results set aside
    i, j = cmd.index("--ft-epochs"), cmd.index("--ft-tasks")
    other = subprocess.run(cmd[:i + 1] + ["2"] + cmd[i + 2:j + 1] + ["objects"] + cmd[j + 4:], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, env=env)
    assert other.returncode == 0, other.stderr[-4000:]
    assert "set aside" in other.stdout and "launchers/pretrain.py" not in other.stdout
    now = json.loads((tmp_path / "results.json").read_text())
    assert now["probe"] == results["probe"] and now["finetune"][rt.FULL]["0"]["epochs"] == 2
    assert now["finetune_earlier"][0]["finetune"] == results["finetune"]
    assert now["finetune_earlier"][0]["finetune_scenes"] == results["finetune_scenes"]
    assert now["finetune_earlier"][0]["finetune_seg"] == results["finetune_seg"]
    bigger = subprocess.run(cmd[:-2] + ["--epochs", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=env)
    assert bigger.returncode != 0 and "another budget" in bigger.stderr and "epochs" in bigger.stderr
