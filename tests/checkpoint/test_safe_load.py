"""hvpmtl.checkpoint.safe_load: a checkpoint file that would run code when loaded is refused and runs nothing."""
import pytest

from hvpmtl import checkpoint as ck
from tests.checkpoint.tagged_run import STEPS, open_quietly, plant, reseal


@pytest.mark.parametrize("name", ["rank_0.pt", "mp_rank_00_model_states.pt"])
def test_a_payload_in_a_resealed_checkpoint_is_refused_and_runs_nothing(copy, tmp_path, name):
    marker = tmp_path / "pwned"
    for s in STEPS:  # every tag: nothing to fall back to
        tag = copy / "checkpoints" / ck.tag_for(s)
        plant(tag / name, marker)
        reseal(tag)  # checksums match: only the unpickler can tell
    with pytest.raises(ck.CheckpointError, match=r"refused to load: it is not a plain weights file"):
        open_quietly(copy)
    assert not marker.exists()
