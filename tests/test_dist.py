"""hvpmtl.dist's object collectives (what the checkpoint decisions travel by): in a world of one (no process group,
or one of one rank) they are the identity; on two gloo ranks every rank gets rank 0's object, every rank's objects in rank order, and rank 0's
error as the caller's exception type."""
import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from hvpmtl.dist import barrier, broadcast_object, gather_objects, on_rank0, rank_world


class Refusal(RuntimeError):
    pass


def test_in_a_world_of_one_they_are_the_identity():
    assert rank_world() == (0, 1)  # this test process: no group, or a group of one (another test's trainer)
    barrier()
    assert broadcast_object({"a": 1}) == {"a": 1} and gather_objects("x") == ["x"]
    assert on_rank0(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(Refusal, match="no"):
        on_rank0(lambda: (_ for _ in ()).throw(ValueError("no")), errors=(ValueError,), raise_as=Refusal)


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        seen = {"rank_world": list(rank_world()), "broadcast": broadcast_object(f"from {rank}"),
                "gathered": gather_objects({"rank": rank})}
        ran = []
        seen["ok"] = on_rank0(lambda: ran.append(rank) or "decided")
        seen["ran"] = ran

        def refuse():
            raise ValueError(f"refused on rank {rank}")
        try:
            on_rank0(refuse, errors=(ValueError,), raise_as=Refusal)
        except Refusal as e:
            seen["error"] = str(e)
        barrier()
        (out_dir / f"{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_on_rank_0s_object_and_error(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    for r in range(2):
        seen = json.loads((tmp_path / f"{r}.json").read_text())
        assert seen["rank_world"] == [r, 2] and seen["broadcast"] == "from 0"
        assert seen["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert seen["ok"] == "decided" and seen["ran"] == ([0] if r == 0 else [])
        assert seen["error"] == "refused on rank 0"
