"""The multi-label fine-tuning loaders (hvpmtl/data/loaders/multilabel.py) on the CPU: labels as the list says, every
image once, a training view that keeps the evaluation's scale, bad lists refused with the file named."""
from pathlib import Path

import numpy as np
import pytest
import torch
from lists import list_labels

from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.loaders.multilabel import build_multilabel_loader, class_names
from hvpmtl.data.tools.synthetic_scenes import CLASSES

NUM_TRAIN, NUM_HOLDOUT = 40, 10  # tests/data/conftest.py
SIZE = 32


def _loader(syn, lst, train, **kw):
    args = dict(num_classes=24, batch_size=4, img_size=SIZE, train=train, device="cpu", num_threads=1, log=print)
    args.update(kw)
    return build_multilabel_loader(syn[lst], syn["root"], **args)


def test_train_batches_carry_the_list_labels_and_cover_the_epoch(syn):
    truth = list_labels(syn["list_file"])
    loader = _loader(syn, "list_file", train=True)
    assert len(loader) == NUM_TRAIN // 4
    seen = []
    for b in loader:
        assert set(b) == {"image", "labels", "index"} and b["image"].shape == (4, 3, SIZE, SIZE)
        for row, i in zip(b["labels"], b["index"].tolist()):
            np.testing.assert_allclose(row.numpy(), truth[loader.labels.path(i)], rtol=0, atol=1e-6)
        seen += b["index"].tolist()
    assert sorted(seen) == list(range(NUM_TRAIN))
    # a threshold turns confidences into multi-hot targets
    b = next(iter(_loader(syn, "list_file", train=True, label_threshold=0.9)))
    for row, i in zip(b["labels"], b["index"].tolist()):
        np.testing.assert_array_equal(row.numpy(), (truth[loader.labels.path(i)] >= 0.9).astype(np.float32))


def test_eval_covers_every_image_once_over_ranks(syn):
    truth = list_labels(syn["holdout_list"])
    seen = []
    for r in range(2):
        ev = _loader(syn, "holdout_list", train=False, rank=r, world_size=2, batch_size=3)
        for b in ev:
            for row, i in zip(b["labels"], b["index"].tolist()):
                np.testing.assert_allclose(row.numpy(), truth[ev.labels.path(i)], atol=1e-6)
            seen += b["index"].tolist()
    assert sorted(seen) == list(range(NUM_HOLDOUT))


def _best_shift_error(view: torch.Tensor, ref: torch.Tensor) -> float:
    """Smallest mean |difference| over the overlap of `view` and `ref` shifted by whole pixels (and flipped)."""
    s, best = view.shape[-1], float("inf")
    for v in (view, view.flip(-1)):
        for dy in range(-s // 4, s // 4 + 1):
            for dx in range(-s // 2, s // 2 + 1):
                a = v[:, max(0, dy):s + min(0, dy), max(0, dx):s + min(0, dx)]
                b = ref[:, max(0, -dy):s + min(0, -dy), max(0, -dx):s + min(0, -dx)]
                best = min(best, float((a - b).abs().mean()))
    return best


def test_training_view_is_a_shifted_crop_at_the_evaluation_scale(syn):
    """Objects keep their size: the training view of an image overlaps its evaluation view pixel for pixel
    at some whole-pixel shift (a random resized crop would rescale it and match at no shift)."""
    ev = _loader(syn, "list_file", train=False, batch_size=NUM_TRAIN)
    ref = next(iter(ev))
    by_id = dict(zip(ref["index"].tolist(), ref["image"]))
    b = next(iter(_loader(syn, "list_file", train=True)))
    errors = [_best_shift_error(img, by_id[i]) for img, i in zip(b["image"], b["index"].tolist())]
    assert max(errors) < 1e-3, errors
    # and the view is random: two epochs crop the same image differently somewhere in the batch
    tr = _loader(syn, "list_file", train=True)
    tr.set_epoch(0)
    first = {i: img for x in tr for img, i in zip(x["image"], x["index"].tolist())}
    tr.set_epoch(1)
    second = {i: img for x in tr for img, i in zip(x["image"], x["index"].tolist())}
    assert any(not torch.equal(first[i], second[i]) for i in first)


def test_class_index_beyond_the_model_is_refused_naming_file_and_line(syn, tmp_path):
    lines = Path(syn["holdout_list"]).read_text().splitlines()
    lines[2] += "\t30:1"  # a class the 24-way model has no output for, on line 3
    lst = tmp_path / "val.txt"  # its data index is built beside it, not in the shared data set
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"val\.txt:3: error \[bad-index\].*class index 30 .* not in \[0, 24\)"):
        _loader(dict(syn, val=str(lst)), "val", train=False)
    # skip_corrupt (data.skip_corrupt) leaves it out, counted
    ev = _loader(dict(syn, val=str(lst)), "val", train=False, skip_corrupt=True)
    assert ev.num_samples == NUM_HOLDOUT - 1 and ev.skipped.left_out == 1
    assert sorted(ev.labels.path(i) for i in range(ev.num_samples)) == sorted(
        ln.split()[0] for k, ln in enumerate(lines) if k != 2)


def test_class_names_from_the_dictionary(syn):
    assert class_names(syn["dictionary"], 24) == [n for n, _ in CLASSES]
    assert class_names("", 3) == ["0", "1", "2"]
    with pytest.raises(DataError, match="model.num_classes is 30 but .*dictionary.txt lists 24"):
        class_names(syn["dictionary"], 30)
