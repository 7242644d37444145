"""The tagged run every checkpoint test reads: real DeepSpeed checkpoints (steps 2, 4, 6) of one in-process
engine, written once per session, and a hard-linked copy of its folder per test to damage."""
import os
import shutil

import pytest

from hvpmtl.config import load_config
from hvpmtl.train.pretrain import Pretrainer
from tests.checkpoint.tagged_run import STEPS


@pytest.fixture(scope="session")
def trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "run"
    cfg = load_config("configs/test_tiny.yaml", [f"run.output_dir={out}", "run.keep_checkpoints=5",
                                                 "tracking.enabled=false"])
    t = Pretrainer(cfg, resume="none")
    t.loader.set_epoch(0)
    for s in STEPS:  # real engine files; no training needed between them
        t.step = s
        t.save()
    yield t
    t.tracker.close()


@pytest.fixture
def copy(trainer, tmp_path):
    """A copy of the run folder (hard links: cheap) to damage."""
    out = tmp_path / "run"
    shutil.copytree(trainer.out_dir, out, copy_function=os.link,
                    ignore=shutil.ignore_patterns(".hvpmtl.lock*", "metrics.jsonl"))
    return out
