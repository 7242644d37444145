"""hvpmtl.checkpoint.finite (issue 19): every manifest says its weights are finite; a tag that is not, by its
manifest or (written before the flag) by its tensors, is passed over."""
import json
import warnings

import pytest

from hvpmtl import checkpoint as ck
from tests.checkpoint.tagged_run import STEPS, nan_in_model_file, open_quietly, rewrite


def test_every_manifest_says_its_weights_are_finite(trainer):
    for s in STEPS:
        assert json.loads((trainer.ckpt_dir / ck.tag_for(s) / "COMPLETE").read_text())["weights_finite"] is True


def test_resume_passes_over_a_checkpoint_with_nan_weights_written_before_the_flag(copy):
    tag = copy / "checkpoints" / ck.tag_for(6)
    nan_in_model_file(tag)
    assert ck.check_contents(tag, ck.read_manifest(tag), [ck.MODEL_FILE]) == ""  # intact as a file
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run = open_quietly(copy)
    assert run.choice.tag_dir.name == ck.tag_for(4)
    said = " ".join(str(x.message) for x in w)
    assert f"{ck.tag_for(6)} could not be loaded (its weights are not finite ({ck.MODEL_FILE}: inf/NaN in module." \
        in said, said


def test_a_manifest_that_says_not_finite_is_passed_over_by_resume_and_candidates(copy):
    tag = copy / "checkpoints" / ck.tag_for(6)
    m = json.loads((tag / "COMPLETE").read_text())
    m["weights_finite"] = False
    rewrite(tag / "COMPLETE", json.dumps(m))
    with pytest.warns(UserWarning, match=r"step_00000006 is not usable \(its weights are not finite"):
        assert [t.name for t in ck.candidates(copy / "checkpoints")] == [ck.tag_for(4), ck.tag_for(2)]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert open_quietly(copy).choice.tag_dir.name == ck.tag_for(4)
