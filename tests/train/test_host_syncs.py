"""Issue 9.5: the training loop reads the host at most once per optimizer step, and its losses, non-finite flags
and preemption flag share one all-reduce; Sinkhorn gets the global batch as a number, not by a collective.
Counted in the real loop by benchmarks/host_syncs.py (calls from hvpmtl's own files; DeepSpeed's gradient
reduction is its own and not counted)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import host_syncs  # noqa: E402

ITERS, VIEWS = 3, 2  # configs/test_tiny.yaml: 3 Sinkhorn iterations per view; 2 views


def test_one_rank_reads_the_host_once_per_step(tmp_path):
    r = host_syncs.count_steps(str(tmp_path / "run"), steps=3)
    assert r["world_size"] == 1
    assert r["host_read"] == {"hvpmtl/dist.py": 1.0}  # the packed losses/flags, nothing else
    assert r["all_reduce_total"] == 0  # one rank: nothing to reduce


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_one_collective_and_one_host_read_per_micro_batch(accum):
    results = host_syncs.count_ranks(2, steps=2, accum=accum)
    assert sorted(results) == [0, 1]
    for rank, r in results.items():
        assert "error" not in r, r
        assert r["world_size"] == 2
        # per optimizer step: one packed all-reduce and one read per micro-batch (the decision to back-propagate
        # a micro-batch needs every rank's non-finite flag), plus Sinkhorn's column sums (2 collectives per
        # iteration and view; no batch-size all-reduce, no host read)
        assert r["all_reduce"] == {"hvpmtl/dist.py": 1.0 * accum, "hvpmtl/losses/sinkhorn.py": 2.0 * ITERS * VIEWS * accum}
        assert r["host_read"] == {"hvpmtl/dist.py": 1.0 * accum}
