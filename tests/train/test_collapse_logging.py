"""The collapse figures reach every step's log, and a head forced into collapse is warned about (1 rank,
real DeepSpeed in this process)."""
import json

from hvpmtl.config import load_config
from hvpmtl.train.pretrain import Pretrainer

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
