"""Online kNN / linear-probe evaluation: called by the engine, identical on 1 and 2 ranks, restores the
backbone's mode, and refuses a config without a held-out list."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hvpmtl.config import ConfigError, load_config
from hvpmtl.data.loaders.pretrain import build_eval_loader
from hvpmtl.eval.features import extract_features, load_backbone
from hvpmtl.eval.knn import knn_eval
from hvpmtl.eval.linear_probe import linear_probe
from hvpmtl.eval.online import console_line, evaluate_online, random_init_scores, split_halves
from hvpmtl.models.backbone import MaskableBackbone
from subprocs import free_port

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 24  # the synthetic dictionary's


def _cfg(syn):
    return load_config(ROOT / "configs/test_tiny.yaml", [
        "model.img_size=32", "data.img_size=32", f"data.num_classes={NUM_CLASSES}", f"data.root={syn['root']}",
        f"data.holdout_list={syn['holdout_list']}", "data.device=cpu"])


def _backbone():
    torch.manual_seed(0)
    return MaskableBackbone("vit_tiny_patch16_224", img_size=32)


def test_engine_logs_online_metrics(pretrain_run):
    evals = [m for m in pretrain_run["metrics"] if "eval/knn_map" in m]
    # step 0: the random init, the baseline the console prints every later evaluation beside (issue 21)
    assert [m["step"] for m in evals] == [0, 2]
    init, evals = evals[0], evals[1:]
    log = pretrain_run["log"]
    assert (f"online eval step 0 (random init): kNN mAP {init['eval/knn_map']:.1f}, "
            f"linear-probe mAP {init['eval/linear_map']:.1f}") in log, log[-3000:]
    line = (f"online eval step 2: kNN mAP {evals[0]['eval/knn_map']:.1f} (random init: {init['eval/knn_map']:.1f}), "
            f"linear-probe mAP {evals[0]['eval/linear_map']:.1f} (random init: {init['eval/linear_map']:.1f})")
    assert log.count(line) == 1, log[-3000:]
    # the numbers are those of the evaluated backbone, recomputed here from the step-2 checkpoint with the run's
    # own saved config: the default weights (at step 2 the student: 99% of the EMA teacher is its random start)
    run_dir = pretrain_run["dir"]
    evaluated = load_backbone(run_dir=run_dir)
    assert evaluated.weights_info["which"] == "student"
    ref = evaluate_online(evaluated, load_config(run_dir / "config.yaml"), device=torch.device("cpu"), rank=0,
                          world_size=1)
    for k in ("eval/knn_map", "eval/linear_map"):
        assert 0 < evals[0][k] <= 100
        assert evals[0][k] == pytest.approx(ref[k], abs=1e-3), k
    from mlflow import MlflowClient
    client = MlflowClient(pretrain_run["tracking_uri"])
    exp = client.get_experiment_by_name("hvpmtl")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.data.metrics["eval/linear_map"] == pytest.approx(evals[0]["eval/linear_map"])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/knn_map")) == [0, 2]


def test_single_rank_matches_the_probes_on_the_same_features(syn):
    cfg = _cfg(syn)
    bb = _backbone().train()
    got = evaluate_online(bb, cfg, device=torch.device("cpu"), rank=0, world_size=1)
    assert bb.training  # mode restored
    f = extract_features(bb, build_eval_loader(cfg.data, batch_size=5, rank=0, world_size=1, local_rank=0),
                         device="cpu")
    assert sorted(f["index"].tolist()) == list(range(24))
    tr, te = split_halves(f["index"])
    assert tr.sum() == te.sum() == 12
    y = f["labels"] > 0
    knn = knn_eval(f["features"][tr], y[tr], f["features"][te], y[te], multilabel=True, num_classes=NUM_CLASSES)
    lin = linear_probe(f["features"][tr], y[tr], f["features"][te], y[te], multilabel=True, num_classes=NUM_CLASSES)
    assert got["eval/knn_map"] == pytest.approx(knn["map"], abs=1e-4)
    assert got["eval/linear_map"] == pytest.approx(lin["map"], abs=1e-3)


def _worker(rank, world, port, syn, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = evaluate_online(_backbone(), _cfg(syn), device=torch.device("cpu"), rank=rank, world_size=world)
        queue.put((rank, r))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_single_rank_numbers(syn):
    ref = evaluate_online(_backbone(), _cfg(syn), device=torch.device("cpu"), rank=0, world_size=1)
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, syn, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    assert results[0] == results[1]  # every rank returns the broadcast numbers
    for k, v in ref.items():
        assert results[0][k] == pytest.approx(v, abs=1e-3)


def test_missing_holdout_list_is_a_config_error(syn):
    cfg = _cfg(syn)
    cfg.data.holdout_list = ""
    with pytest.raises(ConfigError, match="data.holdout_list"):
        evaluate_online(_backbone(), cfg, device=torch.device("cpu"), rank=0, world_size=1)


def test_split_halves_is_by_position():
    tr, te = split_halves(np.array([5, 0, 3, 2]))
    assert tr.tolist() == [False, True, False, True] and te.tolist() == [True, False, True, False]


def test_a_resumed_run_prints_its_random_init_from_metrics_jsonl(tmp_path):
    f = tmp_path / "metrics.jsonl"
    assert random_init_scores(f) is None
    rows = [{"step": 0, "eval/knn_map": 50.0, "eval/linear_map": 55.0}, {"step": 1, "loss": 2.0},
            {"step": 0, "eval/knn_map": 60.04, "eval/linear_map": 65.06}, {"step": 31, "eval/knn_map": 70.0}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 0, "eval/kn')
    init = random_init_scores(f)  # the last run started in the folder
    assert init == {"eval/knn_map": 60.04, "eval/linear_map": 65.06}
    assert console_line(62, {"eval/knn_map": 70.0, "eval/linear_map": 71.0}, init) == (
        "online eval step 62: kNN mAP 70.0 (random init: 60.0), linear-probe mAP 71.0 (random init: 65.1)")
    assert console_line(62, {"eval/knn_map": 70.0, "eval/linear_map": 71.0}, None) == (
        "online eval step 62: kNN mAP 70.0, linear-probe mAP 71.0")


def test_knn_ranks_neighbours_by_what_varies_not_by_a_shared_vector():
    """Issue 21: pooled features share one large vector; raw cosine kNN then ranked by its projections and stayed
    at the random init's mAP while the linear probe rose. The train split's mean and std are taken out first."""
    rng = np.random.default_rng(0)
    n = 400
    y = rng.random((n, 2)) < 0.5
    x = np.concatenate([y + 0.1 * rng.standard_normal((n, 2)),  # what the labels depend on, at a small scale
                        30 * rng.standard_normal((n, 2))], 1) + 100  # nuisance at a large scale, a shared offset
    tr, te = np.arange(n) % 2 == 0, np.arange(n) % 2 == 1
    got = knn_eval(x[tr], y[tr], x[te], y[te], multilabel=True, num_classes=2)["map"]
    assert got > 90
    # an affine change of the features (scale, offset) changes nothing
    same = knn_eval(3 * x[tr] - 7, y[tr], 3 * x[te] - 7, y[te], multilabel=True, num_classes=2)["map"]
    assert same == pytest.approx(got, abs=1e-6)
