"""hvpmtl.checkpoint.convert: a world-size change the converter cannot handle is refused, naming both sizes and
the command to convert it by hand."""
import json
import os

import pytest

from hvpmtl import checkpoint as ck
from hvpmtl.checkpoint import convert
from tests.checkpoint.tagged_run import open_quietly, rewrite


def test_a_world_size_change_the_converter_cannot_handle_is_refused_with_both_sizes_and_the_command(copy,
                                                                                                   monkeypatch):
    tag = copy / "checkpoints" / ck.tag_for(6)
    for a, b in (("rank_0.pt", "rank_1.pt"), ("zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                               "zero_pp_rank_1_mp_rank_00_optim_states.pt")):
        os.link(tag / a, tag / b)
    m = json.loads((tag / "COMPLETE").read_text())
    m["world_size"] = 2
    m["files"]["rank_1.pt"] = dict(m["files"]["rank_0.pt"], ranks=[1])
    m["files"]["zero_pp_rank_1_mp_rank_00_optim_states.pt"] = dict(
        m["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"], ranks=[1])
    rewrite(tag / "COMPLETE", json.dumps(m))

    def fails(*a, **k):
        raise RuntimeError("cannot merge these partitions")
    monkeypatch.setattr(convert, "universal", fails)
    with pytest.raises(ck.CheckpointError, match=r"written by 2 rank\(s\) and cannot be re-partitioned for 1 "
                                                 r"\(RuntimeError: cannot merge.*Resume on 2 rank\(s\), or convert it "
                                                 r"yourself: python -m deepspeed.checkpoint.ds_to_universal "
                                                 r"--input_folder .*step_00000006"):
        open_quietly(copy)
