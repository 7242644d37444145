"""SimMIM masks (block count, grids for Swin and ViT) and dense labels from the CSR table."""
import math

import numpy as np
import pytest
import torch

from hvpmtl.data.formats.list_file import read_list_file, write_list_file
from hvpmtl.data.loaders.labels import LabelTable
from hvpmtl.data.loaders.masks import SimMIMMaskGenerator


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


def _reference_masks(ids, seed, epoch, side, scale, num_masked):
    """SplitMix64 in Python integers (mod 2**64), then the smallest scores: an independent implementation."""
    mask64 = 2**64 - 1

    def mix(x):
        x = (x + 0x9E3779B97F4A7C15) & mask64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask64
        return x ^ (x >> 31)
    key = mix(mix(seed) ^ epoch)
    out = []
    for i in ids:
        scores = [(mix(key ^ mix((i * side * side + b) & mask64)) >> 1, b) for b in range(side * side)]
        chosen = {b for _, b in sorted(scores)[:num_masked]}
        m = np.array([[(r // scale) * side + (c // scale) in chosen for c in range(side * scale)]
                      for r in range(side * scale)])
        out.append(m)
    return np.stack(out)


@pytest.mark.parametrize("seed,epoch", [(0, 0), (7, 3), (2**40 + 5, 11)])
def test_masks_match_an_independent_reference(seed, epoch):
    g = SimMIMMaskGenerator(192, 32, 16, 0.6)  # 6x6 blocks, 2x2 patches each
    ids = [0, 1, 5, 12345, 2**33 + 7]
    got = g(torch.tensor(ids), seed=seed, epoch=epoch)
    assert np.array_equal(got.numpy(), _reference_masks(ids, seed, epoch, 6, 2, math.ceil(36 * 0.6)))
    # made where the ids are (the GPU when the loader runs there); numpy ids give the same masks
    assert torch.equal(g(np.asarray(ids), seed, epoch), got) and got.device == torch.device("cpu")


def test_one_mask_generator_everywhere():
    from hvpmtl.config import DataConfig
    from hvpmtl.data.loaders.tensor_source import TensorSource
    cfg = DataConfig(format="tensors", img_size=64, mask_patch_size=32, num_classes=5, seed=3)
    src = TensorSource(cfg, batch_size=2, patch_size=16, rank=1, world_size=2, num_samples=16)
    b = next(iter(src))
    assert torch.equal(b["mask"], SimMIMMaskGenerator(64, 32, 16, cfg.mask_ratio)(b["index"], 3, 0))


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
