"""hvpmtl.checkpoint.finite (issue 19): every manifest says its weights are finite; a tag whose manifest says
not, or says nothing (an unsupported format), is passed over."""
import json
import warnings

import pytest

from hvpmtl import checkpoint as ck
from tests.checkpoint.tagged_run import STEPS, drop_finite_flag, open_quietly, rewrite


def test_every_manifest_says_its_weights_are_finite(trainer):
    for s in STEPS:
        assert json.loads((trainer.ckpt_dir / ck.tag_for(s) / "COMPLETE").read_text())["weights_finite"] is True


def test_a_manifest_without_the_finite_flag_is_an_unsupported_format_and_passed_over(copy):
    tag = copy / "checkpoints" / ck.tag_for(6)
    drop_finite_flag(tag)
    with pytest.raises(ValueError, match="without the weights_finite flag: written by an unsupported checkpoint"):
        ck.read_manifest(tag)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run = open_quietly(copy)
    assert run.choice.tag_dir.name == ck.tag_for(4)
    said = " ".join(str(x.message) for x in w)
    assert f"{ck.tag_for(6)}" in said and "unsupported checkpoint format" in said, said


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
