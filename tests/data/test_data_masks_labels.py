"""SimMIM masks (block count, grids for Swin and ViT) and dense labels from the CSR table."""
import math

import numpy as np
import pytest
import torch

from hvpmtl.data.labels import LabelTable
from hvpmtl.data.masks import SimMIMMaskGenerator
from hvpmtl.data.tencent import read_list_file, write_list_file


@pytest.mark.parametrize("img,mps,patch,grid", [(224, 32, 4, 56), (224, 32, 16, 14), (192, 32, 4, 48),
                                                 (64, 32, 4, 16), (96, 32, 16, 6)])
def test_mask_ratio_and_grid(img, mps, patch, grid):
    g = SimMIMMaskGenerator(img, mps, patch, 0.6)
    m = g(np.arange(50), seed=1, epoch=0)
    assert m.dtype == torch.bool and m.shape == (50, grid, grid)
    side, scale = img // mps, mps // patch
    blocks = m.view(50, side, scale, side, scale)
    # every block is all-masked or all-visible, and exactly ceil(N * 0.6) blocks are masked
    assert torch.equal(blocks.all(4).all(2), blocks.any(4).any(2))
    assert (blocks[:, :, 0, :, 0].sum((1, 2)) == math.ceil(side * side * 0.6)).all()


def test_masks_depend_on_sample_seed_epoch_only():
    g = SimMIMMaskGenerator(224, 32, 16, 0.6)
    a = g(np.array([5, 9, 11]), seed=0, epoch=2)
    b = g(np.array([11, 5]), seed=0, epoch=2)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(g(np.array([5]), seed=0, epoch=3)[0], a[0])
    assert not torch.equal(g(np.array([5]), seed=1, epoch=2)[0], a[0])
    # masked blocks are spread over the grid, not a fixed subset
    freq = g(np.arange(2000), seed=0, epoch=0).float().mean(0)
    assert freq.min() > 0.5 and freq.max() < 0.7


def test_mask_rejects_incompatible_sizes():
    with pytest.raises(ValueError, match="multiple"):
        SimMIMMaskGenerator(224, 32, 12, 0.6)
    with pytest.raises(ValueError, match="multiple"):
        SimMIMMaskGenerator(200, 32, 4, 0.6)


def test_dense_labels_soft_and_threshold(tmp_path):
    p = tmp_path / "l.txt"
    write_list_file(p, [("a.jpg", {0: 1.0, 4: 0.8}), ("b.jpg", {}), ("c.jpg", {1: 0.9, 2: 0.7, 5: 1.0})])
    labels, _ = read_list_file(p, 6)
    soft = LabelTable(labels, 6).dense(torch.tensor([2, 0, 1, 2]))
    expect = torch.tensor([[0, 0.9, 0.7, 0, 0, 1], [1, 0, 0, 0, 0.8, 0], [0] * 6, [0, 0.9, 0.7, 0, 0, 1]])
    assert soft.dtype == torch.float32 and torch.allclose(soft, expect)
    hard = LabelTable(labels, 6, threshold=0.8).dense(torch.tensor([2, 0, 1]))
    assert torch.equal(hard, torch.tensor([[0, 1, 0, 0, 0, 1], [1, 0, 0, 0, 1, 0], [0] * 6], dtype=torch.float32))
