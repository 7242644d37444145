"""The engine in this process (1 rank, real DeepSpeed ZeRO-2 on gloo): non-finite losses and checkpoints."""
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hvpmtl import checkpoint
from hvpmtl.config import check_batch_sizes, load_config
from hvpmtl.train.exit_codes import EXIT_NONFINITE
from hvpmtl.train.pretrain import Pretrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from host_syncs import ListLoader  # noqa: E402  (a loader over fixed batches, with the engine's loader interface)

pytestmark = pytest.mark.slow  # each test trains a DeepSpeed engine in this process (tens of seconds)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "run"
    cfg = load_config("configs/test_tiny.yaml", [f"run.output_dir={out}", "run.max_nonfinite_in_row=3",
                                                 "run.keep_checkpoints=2", "tracking.enabled=false"])
    t = Pretrainer(cfg, resume="none")
    yield t
    t.tracker.close()


def _params(t):
    return [p.detach().clone() for p in t.engine.module.parameters()]


def test_nonfinite_losses_skip_the_step_count_and_stop(trainer):
    good = next(iter(trainer.loader))
    trainer.loader.set_epoch(0)
    bad = dict(good)
    bad["view1"] = good["view1"].clone()
    bad["view1"][0, 0, 0, 0] = float("nan")
    # one good step first, so there is a state to keep
    trainer.loader = ListLoader([good])
    assert trainer.train_one_epoch() is None and trainer.step == 1
    before = _params(trainer)
    trainer.loader = ListLoader([bad] * 5)
    code = trainer.train_one_epoch()
    assert code == EXIT_NONFINITE
    assert trainer.nonfinite_total == 3 and trainer.step == 1
    # no update reached the weights
    assert all(torch.equal(a, b) for a, b in zip(before, _params(trainer)))
    # and the last good state was saved
    assert (trainer.ckpt_dir / checkpoint.tag_for(1) / "COMPLETE").is_file()
    lines = (trainer.out_dir / "metrics.jsonl").read_text()
    assert '"nonfinite_skipped": 3' in lines


def test_checkpoints_keep_last_n_and_fall_back_past_damaged_ones(trainer):
    trainer.loader = ListLoader([])
    for s in (10, 11, 12):
        trainer.step = s
        trainer.save()
    tags = sorted(p.name for p in trainer.ckpt_dir.glob("step_*"))
    assert tags == [checkpoint.tag_for(11), checkpoint.tag_for(12)]
    assert (trainer.ckpt_dir / "latest").read_text() == checkpoint.tag_for(12)

    # a truncated file: the manifest catches it
    newest = trainer.ckpt_dir / checkpoint.tag_for(12)
    f = newest / "rank_0.pt"
    f.write_bytes(f.read_bytes()[:10])
    with pytest.warns(UserWarning, match=r"step_00000012 is not usable \(rank_0.pt is 10 bytes"):
        cands = checkpoint.candidates(trainer.ckpt_dir)
    assert [c.name for c in cands] == [checkpoint.tag_for(11)]

    # same size but garbage: loading fails, the older one is used, with a warning
    trainer.step = 13
    trainer.save()
    broken = trainer.ckpt_dir / checkpoint.tag_for(13) / "mp_rank_00_model_states.pt"
    broken.write_bytes(b"\0" * broken.stat().st_size)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        trainer.run_state.lock.release()  # a requeued job: the previous one (this trainer) has let go of the folder
        run = checkpoint.open_run(trainer.out_dir, "auto")
        trainer.run_state.lock = run.lock  # the later saves of this module's trainer write under the new lock
        found = checkpoint.resume(trainer.engine, run, log=lambda m: None)
    assert found is not None and found[0].name == checkpoint.tag_for(11) and found[1]["step"] == 11
    assert any("step_00000013 could not be loaded" in str(x.message) for x in w)


def test_interrupted_save_is_never_latest(trainer):
    """A save that died before its manifest leaves `latest` on the previous complete tag."""
    trainer.step = 20
    trainer.save()
    partial = trainer.ckpt_dir / checkpoint.tag_for(21)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert (trainer.ckpt_dir / "latest").read_text() == checkpoint.tag_for(20)
    with pytest.warns(UserWarning, match="no COMPLETE manifest"):
        assert checkpoint.candidates(trainer.ckpt_dir)[0].name == checkpoint.tag_for(20)


def test_gradient_accumulation_equals_the_joined_micro_batch(tmp_path):
    """micro 2 x accumulation 2 takes the same optimizer step as micro 4 x 1 (objectives whose value does not
    depend on the batch split; SwAV's codes do, so it is off), and the teacher moves once, at the boundary."""
    common = ["objectives.swav.enabled=false", "tracking.enabled=false", "optim.max_steps=1",
              "run.checkpoint_every=1000"]
    runs = {}
    for name, micro, accum in (("joined", 4, 1), ("accum", 2, 2)):
        cfg = load_config("configs/test_tiny.yaml", common + [f"run.output_dir={tmp_path / name}",
                                                              f"optim.micro_batch_size={micro}",
                                                              f"optim.grad_accum_steps={accum}"])
        t = Pretrainer(cfg, resume="none")
        teacher_before = [p.clone() for p in t.meta.teacher.parameters()]
        updates = []
        orig = t.meta.teacher.update
        t.meta.teacher.update = lambda *a, **k: (updates.append(1), orig(*a, **k))
        t.loader.set_epoch(0)
        assert t.train_one_epoch() == 0 and t.step == 1
        t.tracker.close()
        runs[name] = (_params(t), [p.clone() for p in t.meta.teacher.parameters()], len(updates),
                      (t.out_dir / "metrics.jsonl").read_text())
        assert any(not torch.equal(a, b) for a, b in zip(teacher_before, runs[name][1]))
    (pa, ta, na, ma), (pb, tb, nb, mb) = runs["joined"], runs["accum"]
    assert na == nb == 1
    for a, b in zip(pa, pb):
        assert torch.allclose(a, b, atol=2e-6, rtol=1e-4)
    for a, b in zip(ta, tb):
        assert torch.allclose(a, b, atol=2e-6, rtol=1e-4)
    import json
    la, lb = json.loads(ma.splitlines()[0]), json.loads(mb.splitlines()[0])
    for k in ("asl", "mim", "distill", "loss"):
        assert abs(la[k] - lb[k]) < 1e-5 * max(1, abs(la[k])), k


def test_every_process_group_has_the_runs_collective_timeout(trainer):
    # DeepSpeed's own groups (ZeRO's clone of the world) are made with torch's 30-minute default; a hung rank
    # then held the others for 30 minutes instead of run.collective_timeout_s (tests/cluster/test_rank_failure)
    import torch.distributed as dist

    groups = list(dist.distributed_c10d._world.pg_map)
    assert len(groups) >= 2, "DeepSpeed made no group of its own: this test no longer tests anything"
    timeouts = {g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups}
    assert timeouts == {trainer.cfg.run.collective_timeout_s}


DS_CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("name", DS_CONFIGS)
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_every_shipped_ds_config_checks_for_overflow_explicitly(trainer, name, precision):
    """Issue 19: DeepSpeed's overflow check is set in our JSON, not left to its defaults, and survives the
    precision fill-in (bf16.check_grad_overflow; compute_grad_norm makes ZeRO-1/2 skip on an inf norm in fp32)."""
    import json

    from hvpmtl.train.deepspeed_setup import build_ds_config

    root = Path(__file__).resolve().parents[2]
    raw = json.loads((root / "ds_configs" / name).read_text())
    assert raw["bf16"]["check_grad_overflow"] is True
    zero = raw.get("zero_optimization", {})
    if zero.get("stage", 0) in (1, 2):
        assert zero["compute_grad_norm"] is True
    cfg = trainer.cfg.model_copy(deep=True)
    cfg.run.ds_config = str(root / "ds_configs" / name)
    ds = build_ds_config(cfg, check_batch_sizes(cfg, 1), precision)
    assert ds["bf16"] == {"enabled": precision == "bf16", "check_grad_overflow": True}
