"""The collapse figures reach every step's log, and a head forced into collapse is warned about (1 rank,
real DeepSpeed in this process); the BatchNorm head's 1-rank = 2-rank equivalence through the launcher."""
import json
import sys
from pathlib import Path

import pytest
from subprocs import free_port, run_cmd

from hvpmtl.config import load_config
from hvpmtl.train.pretrain import Pretrainer

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FIGURES = {"swav/code_entropy", "swav/pred_entropy", "swav/protos_used", "swav/z_std", "swav/z_rank",
           "distill/student_entropy", "distill/teacher_entropy"}


def _train(tmp_path, name, collapse_head):
    cfg = load_config("configs/test_tiny.yaml", [f"run.output_dir={tmp_path / name}", "tracking.enabled=false",
                                                  "optim.max_steps=3", "run.collapse_warn_steps=2",
                                                  "run.checkpoint_every=1000"])
    t = Pretrainer(cfg, resume="none")
    if collapse_head:  # every image gets the same embedding
        t.engine.module.prototype_head.mlp.register_forward_hook(lambda mod, args, out: out * 0 + 1)
    t.loader.set_epoch(0)
    t.train_one_epoch()
    t.tracker.close()
    rows = [json.loads(line) for line in (t.out_dir / "metrics.jsonl").read_text().splitlines()]
    return t, rows


def test_forced_collapse_is_logged_and_warned(tmp_path, capsys):
    t, rows = _train(tmp_path, "collapsed", collapse_head=True)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(FIGURES <= set(r) for r in rows)
    assert all(r["swav/protos_used"] == 1 and r["swav/z_std"] < 1e-6 and r["swav/code_entropy"] > 0.999 for r in rows)
    out = capsys.readouterr().out
    assert "collapse warning at step 2: swav/code_entropy" in out and "swav/z_std" in out
    assert {"swav/code_entropy", "swav/protos_used", "swav/z_std"} <= set(t.collapse_monitor.active)

    t, rows = _train(tmp_path, "healthy", collapse_head=False)
    assert all(r["swav/protos_used"] > 1 and r["swav/z_std"] > 0.01 for r in rows)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "collapse warning" in line]
    assert not [w for w in warnings if "swav/z_std" in w or "swav/protos_used" in w]
    assert not {"swav/protos_used", "swav/z_std"} & set(t.collapse_monitor.active)


@pytest.mark.slow
def test_batchnorm_head_two_ranks_equal_one_rank(tmp_path):
    """The equivalence the global-batch BatchNorm head keeps (docs/DESIGN.md): through the real launcher, 2 ranks
    x 2 give the losses and the collapse figures of 1 rank x 4 (per-rank statistics would not)."""
    runs = {}
    for ranks, micro in ((1, 4), (2, 2)):
        out = tmp_path / f"r{ranks}"
        launch = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
                  str(free_port())] if ranks == 2 else [sys.executable]
        sets = [f"run.output_dir={out}", "optim.max_steps=4", f"optim.micro_batch_size={micro}",
                "model.proto_head_norm=batchnorm", "objectives.swav.view1=unmasked", "tracking.enabled=false"]
        code, log = run_cmd([*launch, "launchers/pretrain.py", "--config", "configs/test_tiny.yaml",
                             *[a for s in sets for a in ("--set", s)]], ROOT, timeout=600)
        assert code == 0, log[-3000:]
        runs[ranks] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in runs[2]] == [1, 2, 3, 4]
    for a, b in zip(runs[1], runs[2]):
        for k in ("loss", "swav", *FIGURES):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
