"""The demo logs what the README promises (issue 13.3: `eval_every: 0` logged no online evaluation although the
README promised online kNN / linear-probe mAP): online evaluation every N steps with the last step among them,
the image panels, and the step count and held-out size the README states."""
from __future__ import annotations

import re

from hvpmtl.config import load_config

from .checkout import REPO

DEMO_IMAGES, DEMO_HOLDOUT, DEMO_RANKS = 3000, 600, 2  # launchers/demo.sh: make-synthetic and deepspeed --num_gpus


def readme_number(pattern: str) -> int:
    m = re.search(pattern, " ".join((REPO / "README.md").read_text().split()))
    assert m, f"README.md no longer says /{pattern}/"
    return int(m.group(1).replace(",", ""))


def test_the_demo_evaluates_online_as_the_readme_says():
    demo = (REPO / "launchers/demo.sh").read_text()
    assert f"--num-images {DEMO_IMAGES} --holdout {DEMO_HOLDOUT}" in demo and f"--num_gpus {DEMO_RANKS}" in demo
    cfg = load_config(REPO / "configs/demo_cpu.yaml")
    steps = cfg.optim.epochs * (DEMO_IMAGES // (cfg.optim.micro_batch_size * DEMO_RANKS))
    assert readme_number(r"for (\d+) steps") == steps
    every = cfg.run.eval_every
    assert every > 0 and cfg.data.holdout_list, "the demo logs no online evaluation"
    assert steps % every == 0, f"the demo's last step ({steps}) is not evaluated (eval_every {every})"
    assert readme_number(r"Every (\d+) steps, the last one included, it evaluates the backbone online") == every
    assert readme_number(r"mAP on the ([\d,]+) held-out images") == DEMO_HOLDOUT
    assert 0 < cfg.run.image_log_every <= steps  # panels during the run (and at its last step: the hook's rule)
