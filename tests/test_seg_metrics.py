"""hvpmtl.seg_metrics against hand-derived cases and an independent float64 numpy reference; the sum over
two real gloo ranks; sliding-window inference against whole-image inference and a hand-derived window case."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from hvpmtl.seg_metrics import (confusion_matrix, per_class_scores, resize_logits, seg_scores, slide_inference,
                                sum_over_ranks, whole_inference)


def reference_scores(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore: int = 255) -> dict:
    """Per class from pixel sets, no confusion matrix: IoU = |P∩T| / |P∪T|, Acc = |P∩T| / |T|; means over
    the classes whose denominator is non-zero."""
    valid = label != ignore
    ious, accs = [], []
    for c in range(num_classes):
        t, p = (label == c) & valid, (pred == c) & valid
        inter, union = float(np.sum(t & p)), float(np.sum(t | p))
        if union > 0:
            ious.append(inter / union)
        if t.sum() > 0:
            accs.append(inter / float(t.sum()))
    correct = float(np.sum((pred == label) & valid))
    return {"mIoU": 100 * np.mean(ious), "mAcc": 100 * np.mean(accs), "aAcc": 100 * correct / float(valid.sum())}


def test_hand_derived_case_with_ignore_and_absent_class():
    label = torch.tensor([[0, 0, 1], [1, 255, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 0]])  # the ignored pixel's prediction (0) must not count
    cm = confusion_matrix(pred, label, num_classes=4)
    assert cm.dtype == torch.int64
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1
    assert torch.equal(cm, expected)
    iou, acc = per_class_scores(cm)
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(acc[:3], [1 / 2, 1.0, 0.0])
    assert math.isnan(iou[3]) and math.isnan(acc[3])  # class 3: in neither label nor prediction
    s = seg_scores(cm)
    assert s["mIoU"] == pytest.approx(100 / 3)  # (1/3 + 2/3 + 0) / 3, class 3 left out
    assert s["mAcc"] == pytest.approx(50.0)  # (1/2 + 1 + 0) / 3
    assert s["aAcc"] == pytest.approx(60.0)  # 3 of 5 labelled pixels


def test_class_only_predicted_counts_as_zero_iou_but_not_in_macc():
    cm = confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 0]), num_classes=4)
    s = seg_scores(cm)
    assert s["mIoU"] == pytest.approx(25.0)  # class 0: 1/2, class 3: 0/1; classes 1, 2 left out
    assert s["mAcc"] == pytest.approx(50.0)  # class 3 has no label pixel: not in the mean
    assert s["aAcc"] == pytest.approx(50.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_independent_reference(seed):
    rng = np.random.default_rng(seed)
    C = 7
    label = rng.integers(0, C - 2, (3, 23, 17))  # classes 5, 6 never labelled ...
    label[rng.random(label.shape) < 0.2] = 255
    pred = np.where(rng.random(label.shape) < 0.6, np.clip(label, 0, C - 1), rng.integers(0, C - 1, label.shape))
    pred[pred == 255] = 0  # ... class 6 never predicted either
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), C)
    got, want = seg_scores(cm), reference_scores(pred, label, C)
    for k in ("mIoU", "mAcc", "aAcc"):
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k


def test_two_rank_halves_sum_to_the_whole():
    rng = np.random.default_rng(5)
    label = torch.from_numpy(rng.integers(0, 5, (4, 31, 29)))
    label[torch.from_numpy(rng.random((4, 31, 29)) < 0.1)] = 255
    pred = torch.from_numpy(rng.integers(0, 5, (4, 31, 29)))
    whole = confusion_matrix(pred, label, 5)
    halves = confusion_matrix(pred[:1], label[:1], 5) + confusion_matrix(pred[1:], label[1:], 5)
    assert torch.equal(whole, halves)
    assert int(whole.sum()) == int((label != 255).sum())


def _sum_worker(rank, world, port, parts, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pred, label = parts[rank]
        cm = sum_over_ranks(confusion_matrix(pred, label, 5))
        # counts beyond float32's exact range must survive the reduction
        big = sum_over_ranks(torch.tensor([2**40 + rank], dtype=torch.int64))
        out[rank] = (cm, big)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sum_over_ranks_with_two_gloo_ranks():
    import socket

    rng = np.random.default_rng(9)
    label = torch.from_numpy(rng.integers(0, 5, (2, 40, 40)))
    label[0, :5] = 255
    pred = torch.from_numpy(rng.integers(0, 5, (2, 40, 40)))
    parts = [(pred[:1], label[:1]), (pred[1:], label[1:])]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_sum_worker, args=(2, port, parts, out), nprocs=2, join=True)
    whole = confusion_matrix(pred, label, 5)
    for r in range(2):
        cm, big = out[r]
        assert torch.equal(cm, whole)
        assert int(big[0]) == 2 * 2**40 + 1


def test_sum_over_ranks_without_process_group_is_identity_and_refuses_float32():
    cm = torch.arange(9, dtype=torch.int64).reshape(3, 3)
    assert torch.equal(sum_over_ranks(cm), cm)
    with pytest.raises(TypeError, match="int64"):
        sum_over_ranks(cm.float())


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match=r"label values"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match=r"predicted classes"):
        confusion_matrix(torch.tensor([0, 9]), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="empty"):
        seg_scores(confusion_matrix(torch.tensor([0]), torch.tensor([255]), 4))


class Pointwise(nn.Module):
    """A 1x1 conv: each output pixel depends on its input pixel only, so windows cannot change it."""

    def __init__(self, num_classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return self.conv(x)


@pytest.mark.parametrize("hw,crop,stride", [((37, 53), 16, 11), ((16, 40), (16, 16), (8, 12)), ((10, 70), 24, 24)])
def test_slide_equals_whole_for_pointwise_model(hw, crop, stride):
    model = Pointwise()
    x = torch.randn(2, 3, *hw)
    whole = whole_inference(model, x, 5)
    model.seen.clear()
    slid = slide_inference(model, x, 5, crop, stride)
    assert slid.shape == (2, 5, *hw)
    assert torch.isfinite(slid).all()  # every pixel covered (0/0 would be NaN)
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)
    c = (crop, crop) if isinstance(crop, int) else crop
    assert set(model.seen) == {tuple(c)}  # every forward at the crop size, padded where the image is smaller


class CropMean(nn.Module):
    """Each crop's logits = the mean of its first channel: the windows show in the output."""

    def forward(self, x):
        return x[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])


def test_slide_windows_hand_derived():
    # W=5, crop 3, stride 2: (5 - 3 + 2 - 1) // 2 + 1 = 2 windows, [0,3) and [2,5); W=6: 3 windows, the last
    # one moved back flush with the border (mmseg): [0,3), [2,5), [3,6)
    x = torch.tensor([0.0, 1, 2, 3, 4]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    got = slide_inference(CropMean(), x, 1, (1, 3), (1, 2)).view(-1)
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0]))
    x6 = torch.tensor([0.0, 1, 2, 3, 4, 5]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    got6 = slide_inference(CropMean(), x6, 1, (1, 3), (1, 2)).view(-1)
    torch.testing.assert_close(got6, torch.tensor([1.0, 1.0, 2.0, 3.5, 3.5, 4.0]))
    # an image narrower than the crop is zero-padded: window [a, b, 0]
    y = torch.tensor([3.0, 6.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    torch.testing.assert_close(slide_inference(CropMean(), y, 1, (1, 3), (1, 2)).view(-1), torch.tensor([3.0, 3.0]))


def test_slide_refuses_stride_above_crop_and_wrong_class_count():
    with pytest.raises(ValueError, match="uncovered"):
        slide_inference(Pointwise(), torch.randn(1, 3, 8, 8), 5, 4, 5)
    with pytest.raises(ValueError, match=r"\[B, 7, H, W\]"):
        whole_inference(Pointwise(), torch.randn(1, 3, 8, 8), 7)


def test_resize_logits_to_label_size():
    logits = torch.randn(1, 3, 8, 12)
    assert resize_logits(logits, (8, 12)) is logits
    assert resize_logits(logits, (17, 5)).shape == (1, 3, 17, 5)
