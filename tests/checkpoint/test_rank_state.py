"""hvpmtl.checkpoint.rank_state: RNG streams as plain data, per-rank state for another world size."""
import random

import numpy as np
import torch

from hvpmtl import checkpoint as ck


def test_rank_state_for_another_world_size():
    def state(r):
        torch.manual_seed(r)
        return {"rng": ck.rng_state(), "data": {"position": 7, "rank": r}, "queue": torch.full((2, 3, 4), float(r))}

    two = [state(0), state(1)]
    ones = ck.rank_state_for_world(two, 0, 1)
    assert ones["data"] == two[0]["data"]
    assert ones["queue"].shape == (2, 6, 4) and sorted(ones["queue"][0, :, 0].tolist()) == [0, 0, 0, 1, 1, 1]
    assert ones["queue"][0, :2, 0].tolist() == [0, 1]  # interleaved by recency
    three = [ck.rank_state_for_world(two, r, 3) for r in range(3)]
    rows = torch.cat([s["queue"] for s in three], dim=1)
    assert rows.shape == (2, 6, 4) and sorted(rows[0, :, 0].tolist()) == [0, 0, 0, 1, 1, 1]  # none lost or doubled
    assert three[2]["data"] == two[0]["data"]
    rngs = [s["rng"]["torch"] for s in three]
    assert not torch.equal(rngs[0], rngs[1]) and not torch.equal(rngs[1], rngs[2])
    assert torch.equal(ck.rank_state_for_world(two, 1, 3)["rng"]["torch"], rngs[1])  # deterministic


def test_rng_state_is_plain_data_and_restores_every_stream(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    st = ck.rng_state()
    torch.save(st, tmp_path / "r.pt")
    ref = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == ref
