"""ADE20K reading (hvpmtl/data/formats/ade20k.py) and its loaders (hvpmtl/data/loaders/ade20k.py) on tiny real
JPEG/PNG pairs written here: label mapping, every bad input, rank-disjoint and resumable training
batches, flip of image and label together, ignore padding, every validation image once over two ranks."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from hvpmtl.data.formats.ade20k import read_ade20k
from hvpmtl.data.loaders.ade20k import (MEAN, STD, SegEvalLoader, SegTrainLoader, normalize, photometric_distortion,
                                       random_crop_box, rescale_size)
from hvpmtl.data.formats.issues import DataError

C = 6  # classes 1..6 in the PNGs, 0 = other
PALETTE = np.array([[128, 128, 128], [230, 30, 30], [30, 200, 40], [30, 40, 220], [240, 220, 30], [200, 40, 220],
                    [20, 210, 220]], np.uint8)  # raw value -> colour painted in the image
SIZES = [(48, 64), (64, 48), (40, 72), (56, 56), (48, 80), (64, 40), (44, 60)]  # (h, w)


def stripes(h: int, w: int, seed: int) -> np.ndarray:
    """Raw labels 0..C as vertical stripes 8 px wide: left/right asymmetric, so a flip shows."""
    rng = np.random.default_rng(seed)
    cols = rng.integers(0, C + 1, (w + 7) // 8)
    cols[0], cols[-1] = 1, 2  # at least two classes, different at the two sides
    return np.repeat(np.repeat(cols, 8)[None, :w], h, axis=0).astype(np.uint8)


def write_pair(root, split: str, name: str, raw: np.ndarray, image=None, label_mode: str = "L"):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    img = PALETTE[np.minimum(raw, C)] if image is None else image
    Image.fromarray(img).save(root / "images" / split / f"{name}.jpg", quality=95)
    if label_mode is not None:
        Image.fromarray(raw, "L").convert(label_mode).save(root / "annotations" / split / f"{name}.png")


def make_ade(root, split="training", n=len(SIZES)):
    for k in range(n):
        h, w = SIZES[k % len(SIZES)]
        write_pair(root, split, f"ADE_{split}_{k:08d}", stripes(h, w, k))
    return root


@pytest.fixture
def ade(tmp_path):
    make_ade(tmp_path, "training")
    make_ade(tmp_path, "validation")
    return tmp_path


def train_loader(split, **kw):
    base = dict(batch_size=2, crop_size=24, rank=0, world_size=1, seed=7, scale=(64, 32), num_threads=1)
    base.update(kw)
    return SegTrainLoader(split, **base)


# -- reading -------------------------------------------------------------------------------------


def test_pairs_sorted_and_labels_mapped(ade):
    sp = read_ade20k(ade, "training", C)
    assert len(sp) == len(SIZES) and [p.name for p in sp.images] == sorted(p.name for p in sp.images)
    assert all(i.stem == a.stem for i, a in zip(sp.images, sp.labels))
    assert [tuple(s) for s in sp.sizes] == SIZES
    raw = stripes(*SIZES[0], 0)
    got = sp.read_label(0)
    assert got.dtype == np.uint8
    assert np.array_equal(got[raw == 0], np.full((raw == 0).sum(), 255))  # 0 ("other") -> ignore
    assert np.array_equal(got[raw > 0], raw[raw > 0] - 1)  # 1..C -> 0..C-1
    assert sp.read_image(0).shape == (*SIZES[0], 3)


def test_full_ade_class_range(tmp_path):
    raw = np.array([[0, 1, 75, 150]] * 4, np.uint8)
    write_pair(tmp_path, "training", "a", raw, image=np.zeros((4, 4, 3), np.uint8))
    assert read_ade20k(tmp_path, "training", 150).read_label(0)[0].tolist() == [255, 0, 74, 149]


def test_palette_png_read_as_its_indices(tmp_path):
    raw = stripes(32, 40, 3)
    write_pair(tmp_path, "training", "a", raw, label_mode=None)
    im = Image.fromarray(raw, "P")
    im.putpalette([(v * 37) % 256 for v in range(768)])  # colours unrelated to the indices
    im.save(tmp_path / "annotations" / "training" / "a.png")
    sp = read_ade20k(tmp_path, "training", C)
    assert np.array_equal(sp.read_raw_label(0), raw)


def test_value_above_num_classes_names_path_and_value(tmp_path):
    raw = stripes(32, 40, 1)
    raw[3, 5] = C + 3
    write_pair(tmp_path, "training", "bad", raw)
    sp = read_ade20k(tmp_path, "training", C)  # headers only: found where the pixels are decoded
    with pytest.raises(DataError, match=rf"bad\.png: label value {C + 3} above num_classes={C}"):
        sp.read_label(0)
    with pytest.raises(DataError, match=rf"bad\.png: label value {C + 3}"):
        read_ade20k(tmp_path, "training", C, check_values=True)
    with pytest.raises(DataError, match=rf"bad\.png: label value {C + 3}"):
        next(iter(train_loader(sp, batch_size=1)))


def test_missing_annotation_names_both(ade):
    (ade / "annotations" / "training" / "ADE_training_00000002.png").unlink()
    with pytest.raises(DataError, match=r"ADE_training_00000002\.jpg: no annotation .*ADE_training_00000002\.png"):
        read_ade20k(ade, "training", C)


def test_size_mismatch(tmp_path):
    write_pair(tmp_path, "training", "a", stripes(32, 40, 0))
    Image.fromarray(stripes(32, 48, 0), "L").save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(DataError, match=r"a\.png: annotation is 48x32 but its image .*a\.jpg is 40x32"):
        read_ade20k(tmp_path, "training", C)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_png_refused(tmp_path, mode):
    write_pair(tmp_path, "training", "a", stripes(32, 40, 0), label_mode=mode)
    with pytest.raises(DataError, match=rf"a\.png: annotation is a {mode} PNG; it must be single-channel class indices"):
        read_ade20k(tmp_path, "training", C)


def test_16_bit_png_refused(tmp_path):
    write_pair(tmp_path, "training", "a", stripes(32, 40, 0), label_mode=None)
    Image.fromarray(stripes(32, 40, 0).astype(np.uint16)).save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(DataError, match=r"a\.png: annotation PNG has mode I;16.*8-bit"):
        read_ade20k(tmp_path, "training", C)


def test_empty_and_missing_split_folders(tmp_path):
    (tmp_path / "images" / "validation").mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(DataError, match=r"images/validation: no \.jpg images"):
        read_ade20k(tmp_path, "validation", C)
    with pytest.raises(DataError, match=r"images/training: no such folder"):
        read_ade20k(tmp_path, "training", C)
    with pytest.raises(DataError, match="split must be one of"):
        read_ade20k(tmp_path, "train", C)


def test_unreadable_and_truncated_images(ade):
    img_dir = ade / "images" / "training"
    (img_dir / "ADE_training_00000001.jpg").write_bytes(b"not an image at all")
    (img_dir / "ADE_training_00000004.jpg").write_bytes(b"")
    with pytest.raises(DataError) as e:
        read_ade20k(ade, "training", C)
    msg = str(e.value)  # every problem listed, each naming its file
    assert "2 of 7 pairs" in msg
    assert "ADE_training_00000001.jpg: cannot read the image" in msg
    assert "ADE_training_00000004.jpg: cannot read the image" in msg
    make_ade(ade, "training")  # restore, then truncate one: the header reads, the pixels do not
    data = (img_dir / "ADE_training_00000003.jpg").read_bytes()
    (img_dir / "ADE_training_00000003.jpg").write_bytes(data[: data.index(b"\xff\xda") + 40])  # into the scan
    sp = read_ade20k(ade, "training", C)
    with pytest.raises(DataError, match=r"ADE_training_00000003\.jpg: cannot decode the image"):
        sp.read_image(3)


def test_annotation_without_image_is_counted_and_reported(ade, caplog):
    Image.fromarray(stripes(8, 8, 0), "L").save(ade / "annotations" / "training" / "lonely.png")
    sp = read_ade20k(ade, "training", C)
    assert sp.orphans == 1 and len(sp) == len(SIZES)
    assert "1 annotation(s) have no image" in caplog.text
    assert "1 annotation(s) without an image left out" in sp.describe()


# -- training loader -----------------------------------------------------------------------------


def test_mmseg_rescale_size():
    # mmcv.imrescale: scale factor min(2048 / long, 512 / short)
    assert rescale_size(375, 500, 2048, 512) == (512, 683)
    assert rescale_size(200, 1200, 2048, 512) == (341, 2048)
    assert rescale_size(48, 64, 64, 32) == (32, 43)


def test_ranks_disjoint_and_same_pixels_whatever_the_rank(ade):
    sp = read_ade20k(ade, "training", C)
    per_rank = [list(train_loader(sp, batch_size=1, rank=r, world_size=2)) for r in range(2)]
    ids = [torch.cat([b["index"] for b in batches]).tolist() for batches in per_rank]
    assert len(ids[0]) == len(ids[1]) == len(SIZES) // 2
    assert not set(ids[0]) & set(ids[1])
    one_rank = train_loader(sp, batch_size=2)  # the same global batches on one rank
    for k, b in enumerate(one_rank):
        assert b["index"].tolist() == [ids[0][k], ids[1][k]]
        assert torch.equal(b["image"][1], per_rank[1][k]["image"][0])
        assert torch.equal(b["label"][0], per_rank[0][k]["label"][0])


def test_batches_shape_dtype_and_epochs_differ(ade):
    sp = read_ade20k(ade, "training", C)
    loader = train_loader(sp)
    assert len(loader) == 3
    e0 = list(loader)
    assert len(e0) == 3
    b = e0[0]
    assert b["image"].shape == (2, 3, 24, 24) and b["image"].dtype == torch.float32
    assert b["label"].shape == (2, 24, 24) and b["label"].dtype == torch.int64
    assert set(torch.unique(b["label"]).tolist()) <= set(range(C)) | {255}
    loader.set_epoch(1)
    e1 = list(loader)
    assert [x["index"].tolist() for x in e0] != [x["index"].tolist() for x in e1]
    again = train_loader(sp)  # nothing global: a fresh loader repeats epoch 0 exactly
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]) for x, y in zip(e0, again))


@pytest.mark.parametrize("stop", [1, 2])
def test_resume_yields_the_remaining_batches_pixels_included(ade, stop):
    sp = read_ade20k(ade, "training", C)
    full = train_loader(sp)
    full.set_epoch(2)
    want = list(full)
    first = train_loader(sp)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(stop):
        next(it)
    sd = first.state_dict()
    assert sd["position"] == stop and sd["epoch"] == 2
    resumed = train_loader(sp)
    resumed.load_state_dict(sd)
    got = list(resumed)
    assert len(got) == len(want) - stop
    for g, w in zip(got, want[stop:]):
        assert torch.equal(g["index"], w["index"])
        assert torch.equal(g["image"], w["image"]) and torch.equal(g["label"], w["label"])
    with pytest.raises(DataError, match="seed"):
        train_loader(sp, seed=8).load_state_dict(sd)


def test_resume_on_another_world_size_continues_the_same_samples(ade):
    sp = read_ade20k(ade, "training", C)
    want = list(train_loader(sp))  # 1 rank x 2
    first = train_loader(sp)
    it = iter(first)
    next(it)
    sd = first.state_dict()
    ranks = []
    for r in range(2):  # 2 ranks x 1
        loader = train_loader(sp, batch_size=1, rank=r, world_size=2)
        loader.load_state_dict(sd)
        ranks.append(list(loader))
    for k, w in enumerate(want[1:]):
        assert [ranks[0][k]["index"].item(), ranks[1][k]["index"].item()] == w["index"].tolist()
        assert torch.equal(torch.cat([ranks[0][k]["image"], ranks[1][k]["image"]]), w["image"])


def denormalise(image: torch.Tensor) -> np.ndarray:
    return image.numpy().transpose(1, 2, 0) * STD + MEAN


def test_image_and_label_flip_together(ade):
    sp = read_ade20k(ade, "training", C)
    # ratio 1: every resized image is at least the crop, so no padding sits on one side only
    plain = train_loader(sp, flip_prob=0.0, photometric=False, ratio_range=(1.0, 1.0))
    flipped = train_loader(sp, flip_prob=1.0, photometric=False, ratio_range=(1.0, 1.0))
    for i in range(len(sp)):
        a, la = plain.sample(i, 0)
        b, lb = flipped.sample(i, 0)
        assert torch.equal(lb, la.flip(-1)) and torch.equal(b, a.flip(-1))  # same draws, mirrored
        # and the flipped image still shows each pixel's class colour (stripes are asymmetric: a flip of
        # one without the other would not)
        colours = denormalise(b)
        lab = lb.numpy()
        inner = np.zeros_like(lab, bool)
        inner[:, 2:-2] = (lab[:, 2:-2] == lab[:, :-4]) & (lab[:, 2:-2] == lab[:, 4:])  # away from stripe edges
        inner &= lab != 255
        raw_class = np.where(lab == 255, 0, lab + 1)
        dist = np.linalg.norm(colours[..., None, :] - PALETTE[None, None].astype(np.float32), axis=-1)
        assert inner.sum() > 50
        assert (dist.argmin(-1)[inner] == raw_class[inner]).mean() > 0.97


def test_flip_happens_about_half_the_time(ade):
    sp = read_ade20k(ade, "training", C)
    plain = train_loader(sp, flip_prob=0.0, photometric=False, ratio_range=(1.0, 1.0))
    default = train_loader(sp, photometric=False, ratio_range=(1.0, 1.0))
    flips = 0
    for e in range(6):
        for i in range(len(sp)):
            la, lb = plain.sample(i, e)[1], default.sample(i, e)[1]
            flips += int(not torch.equal(la, lb))
            assert torch.equal(lb, la) or torch.equal(lb, la.flip(-1))
    assert 8 < flips < 34  # of 42, p = 1/2


def test_pad_to_crop_with_ignore(ade):
    sp = read_ade20k(ade, "training", C)
    # 48x64 at scale (64, 32), ratio 1 -> 32x43; crop 40x48 pads 8 rows and 5 columns
    loader = train_loader(sp, crop_size=(40, 48), ratio_range=(1.0, 1.0), photometric=False, flip_prob=0.0)
    image, label = loader.sample(0, 0)
    assert image.shape == (3, 40, 48) and label.shape == (40, 48)
    assert (label[32:] == 255).all() and (label[:, 43:] == 255).all()
    assert (image[:, 32:] == 0).all() and (image[:, :, 43:] == 0).all()  # the mean colour after normalising
    inside = label[:32, :43]
    assert (inside != 255).float().mean() > 0.5
    expect = np.asarray(Image.fromarray(sp.read_label(0)).resize((43, 32), Image.NEAREST))
    assert np.array_equal(inside.numpy(), expect)  # labels resized nearest, never blended


def test_normalise_uses_pretraining_mean_and_std():
    mean_img = np.broadcast_to(np.round(MEAN).astype(np.uint8), (4, 5, 3)).copy()
    out = normalize(mean_img)
    assert out.shape == (3, 4, 5)
    np.testing.assert_allclose(out.numpy(), ((np.round(MEAN) - MEAN) / STD)[:, None, None] * np.ones((3, 4, 5)),
                               atol=1e-6)
    assert np.allclose(MEAN, [0.485 * 255, 0.456 * 255, 0.406 * 255]) and np.allclose(STD, [0.229 * 255, 0.224 * 255,
                                                                                            0.225 * 255])


def test_cat_max_ratio_prefers_mixed_crops():
    label = np.zeros((64, 64), np.uint8)
    label[:, 52:] = 1  # class 1 in a 12-column band: most 16x16 crops see class 0 only
    label[:4] = 255

    def ok(box):
        v, c = np.unique(label[box[0]:box[1], box[2]:box[3]], return_counts=True)
        c = c[v != 255]
        return len(c) > 1 and c.max() / c.sum() < 0.75

    boxes = {r: [random_crop_box(label, (16, 16), np.random.default_rng(s), r) for s in range(300)] for r in (0.75, 1.0)}
    assert all(b[1] - b[0] == 16 and b[3] - b[2] == 16 for b in boxes[0.75])
    rate = {r: np.mean([ok(b) for b in bs]) for r, bs in boxes.items()}
    assert rate[1.0] < 0.3 and rate[0.75] > 0.75  # 0.18 by chance; 1 - 0.82 ** 11 = 0.89 with 11 draws


def test_photometric_distortion_keeps_grey_grey_and_changes_colours():
    grey = np.full((8, 8, 3), 100, np.uint8)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    changed, hue_moved = 0, 0
    for s in range(40):
        g = photometric_distortion(grey, np.random.default_rng(s))
        assert g.dtype == np.uint8 and g.shape == grey.shape
        assert np.abs(g.astype(int) - g[..., :1].astype(int)).max() <= 1  # saturation/hue cannot colour grey
        changed += int(not np.array_equal(g, grey))
        r = photometric_distortion(red, np.random.default_rng(s)).astype(int)
        hue_moved += int(r[..., 1].max() > 2 or r[..., 2].max() > 2)  # a hue shift takes red towards green/blue
    assert 15 < changed < 40 and hue_moved > 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="base"):
        SegTrainLoader(None, 2, 24, 0, 1, 0, scale=(0.5, 2.0))
    with pytest.raises(ValueError, match="rank"):
        SegTrainLoader(None, 2, 24, 2, 2, 0)


def test_too_few_images_for_a_batch(ade):
    sp = read_ade20k(ade, "training", C)
    with pytest.raises(DataError, match="make no batch"):
        train_loader(sp, batch_size=4, world_size=2)


# -- evaluation loader ---------------------------------------------------------------------------


def test_every_val_image_once_over_two_ranks_at_original_label_size(ade):
    sp = read_ade20k(ade, "validation", C)
    seen = []
    for r in range(2):
        loader = SegEvalLoader(sp, batch_size=2, rank=r, world_size=2, short_side=32)
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            B = len(b["index"])
            assert b["image"].shape[0] == B and b["size"].shape == (B, 2) and len(b["label"]) == B
            for k, i in enumerate(b["index"].tolist()):
                seen.append(i)
                h, w = b["size"][k].tolist()
                assert min(h, w) == 32
                assert b["image"].shape[2] >= h and b["image"].shape[3] >= w
                assert (b["image"][k, :, h:] == 0).all() and (b["image"][k, :, :, w:] == 0).all()
                assert tuple(b["label"][k].shape) == SIZES[i]  # the original label
                assert torch.equal(b["label"][k], torch.from_numpy(sp.read_label(i).astype(np.int64)))
    assert sorted(seen) == list(range(len(sp)))  # each exactly once


def test_eval_long_side_cap():
    loader = SegEvalLoader.__new__(SegEvalLoader)
    loader.short_side, loader.max_long_side = 512, 2048
    assert loader.resized_size(200, 1200) == (341, 2048)
    loader.max_long_side = None
    assert loader.resized_size(200, 1200) == (512, 3072)


def test_eval_batch_scores_with_batch_confusion(ade):
    """A perfect 'model' (the label itself as one-hot logits at the resized size) scores 100 % through the
    padding, the crop back to each image's size and the resize to the original label."""
    from hvpmtl.seg_metrics import batch_confusion, seg_scores

    sp = read_ade20k(ade, "validation", C)
    cm = torch.zeros(C, C, dtype=torch.int64)
    for b in SegEvalLoader(sp, batch_size=3, rank=0, world_size=1, short_side=32):
        H, W = b["image"].shape[-2:]
        logits = torch.full((len(b["label"]), C, H, W), -1.0)
        for k, lab in enumerate(b["label"]):
            h, w = b["size"][k].tolist()
            small = torch.from_numpy(np.array(Image.fromarray(lab.numpy().astype(np.uint8)).resize((w, h),
                                                                                                    Image.NEAREST)))
            onehot = torch.nn.functional.one_hot(small.long().clamp(max=C - 1), C).permute(2, 0, 1).float()
            logits[k, :, :h, :w] = onehot * 10 * (small != 255)
        cm += batch_confusion(logits, b["size"], b["label"], C)
    s = seg_scores(cm)
    assert cm.sum() == sum(int((sp.read_label(i) != 255).sum()) for i in range(len(sp)))
    assert s["aAcc"] > 90  # nearest down then bilinear up loses only pixels at stripe edges


def test_jpeg_bytes_helper_roundtrip():
    """The fixture's images decode to the colours of their classes (the flip test relies on it)."""
    raw = stripes(32, 40, 0)
    buf = io.BytesIO()
    Image.fromarray(PALETTE[raw]).save(buf, format="JPEG", quality=95)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float32)
    d = np.linalg.norm(back[..., None, :] - PALETTE[None, None].astype(np.float32), axis=-1)
    assert (d.argmin(-1) == raw).mean() > 0.95
