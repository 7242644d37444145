"""hvpmtl.checkpoint.save: pruning by run on real DeepSpeed checkpoints."""
from hvpmtl import checkpoint as ck


def test_pruning_keeps_the_tag_just_written_and_drops_this_runs_passed_over_ones(trainer, copy):
    ckpt = copy / "checkpoints"
    run_id = trainer.run_state.run_id
    (ckpt / ck.tag_for(3)).mkdir()  # debris of a crashed save
    # resumed from 4 (6 was damaged), now writing 5: 6 is from the abandoned future, 2 is beyond keep=2
    removed = ck.prune(ckpt, run_id, ckpt / ck.tag_for(4), keep=2)
    assert sorted(p.name for p in removed) == [ck.tag_for(3), ck.tag_for(6)]
    assert sorted(p.name for p in ckpt.glob("step_*")) == [ck.tag_for(2), ck.tag_for(4)]
    # keep=1 never removes the tag just written
    ck.prune(ckpt, run_id, ckpt / ck.tag_for(4), keep=1)
    assert sorted(p.name for p in ckpt.glob("step_*")) == [ck.tag_for(4)]
