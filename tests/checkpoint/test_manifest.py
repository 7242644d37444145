"""hvpmtl.checkpoint.manifest on real DeepSpeed checkpoints: every file named with its size, checksum and ranks."""
import json

import torch

from hvpmtl import checkpoint as ck
from hvpmtl.fileio import sha256_file


def test_manifest_names_run_world_size_and_every_file_with_its_checksum(trainer):
    tag = trainer.ckpt_dir / ck.tag_for(6)
    m = json.loads((tag / "COMPLETE").read_text())
    assert m["run_id"] == trainer.run_state.run_id and m["world_size"] == 1 and m["step"] == 6
    on_disk = {p.name for p in tag.iterdir() if p.name != "COMPLETE"}
    assert set(m["files"]) == on_disk == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                          "rank_0.pt"}
    for name, e in m["files"].items():
        assert e["size"] == (tag / name).stat().st_size
        assert e["sha256"] == sha256_file(tag / name)
    assert m["files"]["mp_rank_00_model_states.pt"]["ranks"] == "all"
    assert m["files"]["rank_0.pt"]["ranks"] == [0]
    # rank files are plain data: the weights-only unpickler reads them with no allow-list at all
    state = torch.load(tag / "rank_0.pt", weights_only=True)
    assert set(state) >= {"rng", "data", "queue"}
