"""ZeRO stage 0, 1 and 2 (ds_configs/zero{0,1,2}.json) train the same model: the same losses to 1e-5 over a few
optimizer steps with gradient accumulation (stage 2 reduces gradients at every micro-batch, stage 1 once per
step, stage 0 is DeepSpeed's plain data parallelism), through the real DeepSpeed engine on the CPU, in one rank
and in two (where stages 1 and 2 partition the optimizer state).

Also the worker of the 2-rank test: `torchrun --nproc_per_node 2 tests/train/test_zero_stages.py OUT`."""
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/test_tiny.yaml"
STAGES = (0, 1, 2)
STEPS, ACCUM, MICRO = 3, 2, 2


def run_stage(stage: int, out: Path) -> dict:
    """STEPS optimizer steps of configs/test_tiny.yaml (fp32, micro-batch 2, 2 accumulation steps) under
    ds_configs/zero<stage>.json: every micro-batch's losses (reduced over ranks) and the final weights."""
    from hvpmtl.config import load_config
    from hvpmtl.train.pretrain import Pretrainer
    cfg = load_config(TINY, [f"run.output_dir={out / f'zero{stage}'}",
                             f"run.ds_config={ROOT / f'ds_configs/zero{stage}.json'}",
                             "run.precision=fp32", "tracking.enabled=false", f"optim.micro_batch_size={MICRO}",
                             f"optim.grad_accum_steps={ACCUM}", f"optim.max_steps={STEPS}"])
    t = Pretrainer(cfg, resume="none")
    try:
        assert t.engine.zero_optimization_stage() == stage
        losses = []
        for i, batch in enumerate(islice(iter(t.loader), STEPS * ACCUM)):
            r = t.meta.forward_backward(batch, step=i // ACCUM)
            assert not r.nonfinite and r.boundary == ((i + 1) % ACCUM == 0)
            losses.append(r.losses)
            if r.boundary:
                t.meta.update_teacher(t.momentum[i // ACCUM])
        assert t.engine.global_steps == STEPS
        weights = torch.cat([p.detach().float().reshape(-1) for p in t.engine.module.parameters()])
        return {"losses": losses, "weights": weights, "world": t.world}
    finally:
        t.tracker.close()


def assert_stages_agree(runs: dict) -> None:
    ref = runs[0]
    assert len(ref["losses"]) == STEPS * ACCUM
    first, last = ref["losses"][0]["loss"], ref["losses"][-1]["loss"]
    assert first != last  # the weights moved: the comparison is not of one step repeated
    for stage in STAGES[1:]:
        got = runs[stage]
        for i, (a, b) in enumerate(zip(ref["losses"], got["losses"])):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (stage, i, k)
        w0, w = ref["weights"], got["weights"]
        assert torch.allclose(w, w0, rtol=1e-4, atol=1e-5), (stage, (w - w0).abs().max().item())


@pytest.mark.slow
def test_zero_stages_0_1_2_give_the_same_losses_in_one_rank(tmp_path):
    runs = {s: run_stage(s, tmp_path) for s in STAGES}
    assert runs[0]["world"] == 1
    assert_stages_agree(runs)


@pytest.mark.slow
def test_zero_stages_0_1_2_give_the_same_losses_on_two_ranks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    p = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", __file__, str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for runs in (r0, r1):
        assert runs[0]["world"] == 2
        assert_stages_agree(runs)
    for s in STAGES:  # ranks hold the same weights whatever the stage
        assert torch.equal(r0[s]["weights"], r1[s]["weights"]), s


def _worker(out: Path) -> None:
    torch.save({s: run_stage(s, out) for s in STAGES}, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]))
