"""The DALI pre-training loader on the CPU: batch contents, sharding, reshuffle, resume, shards, eval."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lists import list_labels
from PIL import Image

from hvpmtl.cli import main as cli_main
from hvpmtl.data.loaders.imagefolder import build_imagefolder_loader
from hvpmtl.data.loaders.order import epoch_batches
from hvpmtl.data.loaders.pretrain import build_eval_loader, build_pretrain_loader

NUM_TRAIN, NUM_HOLDOUT = 40, 10  # tests/data/conftest.py


@pytest.fixture
def make(syn, tiny_cfg):
    def _make(*, rank=0, world=1, batch=4, patch=4, seed=0, dtype=torch.float32, **kw):
        return build_pretrain_loader(tiny_cfg(syn, **kw), batch_size=batch, patch_size=patch, rank=rank,
                                     world_size=world, local_rank=0, seed=seed, dtype=dtype)
    return _make


def test_epoch_batches_and_labels_match_list_file(syn, make):
    truth = list_labels(syn["list_file"])
    loader = make(batch=4)
    assert len(loader) == NUM_TRAIN // 4 and loader.num_samples == NUM_TRAIN and loader.skipped_corrupt == 0
    seen = []
    for b in loader:
        assert b["view1"].shape == b["view2"].shape == (4, 3, 64, 64)
        assert b["view1"].dtype == torch.float32 and b["index"].dtype == torch.int64
        assert not torch.allclose(b["view1"], b["view2"])  # own random draws per view
        assert b["mask"].dtype == torch.bool and b["mask"].shape == (4, 16, 16)  # Swin: patch 4 at 64 px
        assert (b["mask"][:, ::8, ::8].sum((1, 2)) == math.ceil(4 * 0.6)).all()
        assert b["labels"].shape == (4, 24) and b["labels"].dtype == torch.float32
        for row, i in zip(b["labels"], b["index"].tolist()):
            np.testing.assert_allclose(row.numpy(), truth[loader.labels.path(i)], rtol=0, atol=1e-6)
        # normalised with ImageNet statistics: values span roughly [-2.2, 2.7]
        assert b["view1"].min() >= -2.2 and b["view1"].max() <= 2.7
        seen += b["index"].tolist()
    assert sorted(seen) == list(range(NUM_TRAIN))
    assert seen == epoch_batches(NUM_TRAIN, 4, 1, 0, 0, 0).reshape(-1).tolist()


def test_vit_grid_threshold_labels_and_half_precision(syn, make):
    truth = list_labels(syn["list_file"])
    loader = make(batch=5, patch=16, label_threshold=0.85, dtype=torch.bfloat16)
    b = next(iter(loader))
    assert b["mask"].shape == (5, 4, 4)  # ViT: patch 16 at 64 px, 2x2 blocks of 32 px
    assert (b["mask"][:, ::2, ::2].sum((1, 2)) == 3).all()
    assert b["view1"].dtype == torch.bfloat16 and b["labels"].dtype == torch.float32
    for row, i in zip(b["labels"], b["index"].tolist()):
        assert torch.equal(row, torch.from_numpy(truth[loader.labels.path(i)] >= 0.85).float())
    assert set(b["labels"].unique().tolist()) == {0.0, 1.0}


def test_two_ranks_disjoint_cover_and_reshuffle(syn, make):
    loaders = [make(rank=r, world=2, batch=3) for r in range(2)]
    assert [len(x) for x in loaders] == [NUM_TRAIN // 6] * 2
    per_epoch = []
    for epoch in (0, 1):
        ids = []
        for x in loaders:
            x.set_epoch(epoch)
            ids.append([i for b in x for i in b["index"].tolist()])
        assert len(ids[0]) == len(ids[1]) == 3 * (NUM_TRAIN // 6)
        assert not set(ids[0]) & set(ids[1])  # disjoint
        assert len(set(ids[0]) | set(ids[1])) == 6 * (NUM_TRAIN // 6)  # all but the N mod 6 dropped
        per_epoch.append(ids)
    assert per_epoch[0][0] != per_epoch[1][0]  # reshuffled per epoch
    again = make(rank=0, world=2, batch=3)
    again.set_epoch(1)
    assert [i for b in again for i in b["index"].tolist()] == per_epoch[1][0]  # deterministic from seed + epoch


def test_resume_yields_the_same_batches_pixels_included(syn, make):
    kw = dict(batch=4, rand_augment_n=2, rand_augment_m=9)
    a = make(**kw)
    first_epoch = [x["index"].tolist() for x in a]  # epoch 0 runs through; epoch 3 reuses its pipeline
    a.set_epoch(3)
    it = iter(a)
    head = [next(it) for _ in range(3)]
    sd = a.state_dict()
    assert sd["epoch"] == 3 and sd["position"] == 3 and sd["dali"]
    tail = list(it)
    assert len(head) + len(tail) == len(a) == len(first_epoch)
    assert [x["index"].tolist() for x in head + tail] == epoch_batches(NUM_TRAIN, 4, 1, 0, 0, 3).tolist()
    b = make(**kw)
    b.load_state_dict(sd)
    resumed = list(b)
    assert [x["index"].tolist() for x in resumed] == [x["index"].tolist() for x in tail]
    for x, y in zip(resumed, tail):
        for k in ("view1", "view2", "mask", "labels"):
            assert torch.equal(x[k], y[k]), k
    # without the DALI part (e.g. another rank's state): the same samples, fresh augmentation draws
    c = make(batch=4)
    c.load_state_dict({**sd, "dali": None})
    assert [x["index"].tolist() for x in c] == [x["index"].tolist() for x in tail]
    # a different world size resumes at the same global position: the rest of the epoch, each sample once
    parts = []
    for r in range(2):
        d = make(batch=2, rank=r, world=2)
        d.load_state_dict(sd)
        parts += [i for x in d for i in x["index"].tolist()]
    order = epoch_batches(NUM_TRAIN, 4, 1, 0, 0, 3).reshape(-1)
    assert sorted(parts) == sorted(order[12:].tolist())


def test_class_count_must_match_dictionary(syn, make):
    from hvpmtl.data.formats.issues import DataError
    with pytest.raises(DataError, match="num_classes is 30 but .*dictionary.txt lists 24"):
        make(num_classes=30)


def test_break_and_continue_keeps_position(syn, make):
    a = make(batch=8)
    first = []
    for k, x in enumerate(a):
        first.append(x["index"].tolist())
        if k == 1:
            break
    rest = [x["index"].tolist() for x in a]
    assert first + rest == epoch_batches(NUM_TRAIN, 8, 1, 0, 0, 0).tolist()


def test_shards_round_trip(syn, make, tmp_path):
    truth = list_labels(syn["list_file"])
    out = tmp_path / "shards"
    assert cli_main(["data", "to-shards", "--list", syn["list_file"], "--root", syn["root"], "--out", str(out),
                     "--shard-size", "7", "--dictionary", syn["dictionary"]]) == 0
    assert len(list(out.glob("*.tar"))) == math.ceil(NUM_TRAIN / 7) == len(list(out.glob("*.idx")))
    assert cli_main(["data", "validate", "--shards", str(out)]) == 0
    seen = []
    for r in range(2):
        loader = make(rank=r, world=2, batch=5, format="shards", shards=str(out))
        assert loader.num_samples == NUM_TRAIN and len(loader) == NUM_TRAIN // 10
        for b in loader:
            assert b["view1"].shape == (5, 3, 64, 64)
            for row, i in zip(b["labels"], b["index"].tolist()):
                np.testing.assert_allclose(row.numpy(), truth[loader.labels.path(i)], atol=1e-6)
            seen.append(b["index"].tolist())
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)) == NUM_TRAIN  # 2 ranks x 20 samples: disjoint and complete


def test_eval_loader_covers_holdout_once(syn, tiny_cfg):
    truth = list_labels(syn["holdout_list"])
    cfg = tiny_cfg(syn)
    seen, images = [], {}
    for r in range(2):
        ev = build_eval_loader(cfg, batch_size=3, rank=r, world_size=2, local_rank=0)
        assert len(ev) == 2  # 5 samples per rank: 3 + 2
        for b in ev:
            assert set(b) == {"image", "labels", "index"} and b["image"].shape[1:] == (3, 64, 64)
            for row, img, i in zip(b["labels"], b["image"], b["index"].tolist()):
                np.testing.assert_allclose(row.numpy(), truth[ev.labels.path(i)], atol=1e-6)
                images[i] = img
            seen += b["index"].tolist()
    assert sorted(seen) == list(range(NUM_HOLDOUT))
    again = next(iter(build_eval_loader(cfg, batch_size=3, rank=0, world_size=2, local_rank=0)))
    assert torch.equal(again["image"][0], images[again["index"][0].item()])  # no randomness


def test_imagefolder_loaders(syn, tmp_path):
    root = tmp_path / "folder"
    src = sorted(Path(syn["root"], "train").rglob("*.jpg"))
    for k, p in enumerate(src[:10]):
        d = root / ("cats" if k % 2 else "dogs")
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).write_bytes(p.read_bytes())
    train = build_imagefolder_loader(str(root), batch_size=4, img_size=32, train=True, rank=0, world_size=1, seed=0,
                                     device="cpu", num_threads=1)
    assert train.classes == ["cats", "dogs"] and len(train) == 2
    for b in train:
        assert b["image"].shape == (4, 3, 32, 32) and b["label"].dtype == torch.int64
        for lab, i in zip(b["label"].tolist(), b["index"].tolist()):
            assert train.classes[lab] == Path(train.labels.path(i)).parent.name
    ev = build_imagefolder_loader(str(root), batch_size=4, img_size=32, train=False, rank=0, world_size=1, seed=0,
                                  device="cpu", num_threads=1)
    got = [(i, lab) for b in ev for i, lab in zip(b["index"].tolist(), b["label"].tolist())]
    assert sorted(i for i, _ in got) == list(range(10)) and all(ev.classes[lab] == Path(ev.labels.path(i)).parent.name
                                                               for i, lab in got)
    im = np.asarray(Image.open(root / ev.labels.path(0)).convert("RGB"))
    assert im.ndim == 3


# ----------------------------------------------------------------------------- a changed data set on resume (issue 23)

def _lines(loader, batches) -> list[int]:
    """The list-file lines of a loader's batches: a sample's stable id, whatever the dense ids are."""
    return [loader.labels.line(i) for b in batches for i in b["index"].tolist()]


def _skip_list(tmp_path, syn, loader, lines) -> str:
    name = Path(syn["list_file"]).name
    rows = ["# hvpmtl skip list: file\tline\tpath-or-key\tcode"]
    by_line = {loader.labels.line(i): loader.labels.path(i) for i in range(loader.num_samples)}
    rows += [f"{name}\t{line}\t{by_line[line]}\ttruncated" for line in lines]
    path = tmp_path / "skip.txt"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_resume_after_samples_are_left_out_continues_the_epoch_by_sample_id(syn, make, tmp_path):
    a = make(batch=4)
    a.set_epoch(2)
    it = iter(a)
    head = [next(it) for _ in range(3)]
    sd = a.state_dict()
    tail = list(it)
    seen, rest = _lines(a, head), _lines(a, tail)
    # the validator's verdict on two samples: one already trained on in this epoch, one still to come
    b = make(batch=4, skip_list=_skip_list(tmp_path, syn, a, [seen[5], rest[2]]))
    assert b.num_samples == NUM_TRAIN - 2
    b.load_state_dict(sd)
    assert "40 -> 38 samples (2 left out, 0 added)" in b.resume_note and "1 of them now left out" in b.resume_note
    it = iter(b)
    first = next(it)
    sd2 = b.state_dict()
    resumed = [first, *it]
    want = [line for line in rest if line != rest[2]]
    want = want[:len(want) // 4 * 4]  # whole batches
    assert _lines(b, resumed) == want  # the saved epoch's remaining samples, in their order, less the one left out
    assert not set(_lines(b, resumed)) & set(seen)
    # a state saved inside the remapped epoch resumes it again (same population: the DALI part applies)
    assert sd2["remap"] is not None and sd2["position"] == 1
    c = make(batch=4, skip_list=_skip_list(tmp_path, syn, a, [seen[5], rest[2]]))
    c.load_state_dict(sd2)
    assert _lines(c, list(c)) == want[4:]
    # the next epoch is the plain permutation of the new population
    c.set_epoch(3)
    assert [i for x in c for i in x["index"].tolist()] == epoch_batches(NUM_TRAIN - 2, 4, 1, 0, 0, 3).reshape(-1).tolist()


def test_resume_after_samples_are_added_at_the_end(tmp_path, tiny_cfg):
    from hvpmtl.data.tools.synthetic import make_synthetic
    small = make_synthetic(tmp_path / "d", 16, seed=1)

    def build():
        cfg = tiny_cfg({**small, "holdout_list": ""})
        return build_pretrain_loader(cfg, batch_size=2, patch_size=4, rank=0, world_size=1, local_rank=0, seed=0,
                                     dtype=torch.float32)
    a = build()
    it = iter(a)
    head = [next(it) for _ in range(3)]
    sd = a.state_dict()
    rest = _lines(a, list(it))
    root, listing = Path(small["root"]), Path(small["list_file"])
    lines = listing.read_text().splitlines()
    for k, line in enumerate(lines[:2]):  # two more images, appended to the list
        path, labels = line.split("\t", 1)
        (root / f"added_{k}.jpg").write_bytes((root / path).read_bytes())
        lines.append(f"added_{k}.jpg\t{labels}")
    listing.write_text("\n".join(lines) + "\n")
    b = build()
    assert b.num_samples == 18
    b.load_state_dict(sd)
    assert "16 -> 18 samples (0 left out, 2 added)" in b.resume_note
    got = _lines(b, list(b))
    assert got[:len(rest)] == rest and sorted(got[len(rest):]) == [17, 18]
    assert not set(got) & set(_lines(a, head))


def test_another_list_or_seed_is_refused_naming_what_differs(syn, make, tmp_path, tiny_cfg):
    from hvpmtl.data.formats.issues import DataError
    a = make(batch=4)
    next(iter(a))
    sd = a.state_dict()
    with pytest.raises(DataError, match=r"data.seed 0, this run has 5.*--resume fresh"):
        make(batch=4, seed=5).check_resume(sd)
    other = tmp_path / "train.txt"  # the same images listed in another order: another data set by sample id
    other.write_text("\n".join(reversed(Path(syn["list_file"]).read_text().splitlines())) + "\n")
    b = make(batch=4, list_file=str(other))
    with pytest.raises(DataError, match=r"train.txt is not the data set this run was trained on: sample 0 was "
                                        r"'.*' \(line 1\), it is now '.*' \(line 1\).*--resume fresh"):
        b.load_state_dict(sd)
