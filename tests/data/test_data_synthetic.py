"""The synthetic generator: parseable Tencent files whose labels match the drawn objects."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from hvpmtl.cli import main as cli_main
from hvpmtl.data.synthetic import COLOURS, OBJECT_CLASSES, make_synthetic, object_class, render_scene
from hvpmtl.data.tencent import read_dictionary, read_list_file
from hvpmtl.data.validate import validate_list


def _objects(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_files_parse_and_validate_clean(syn):
    d = read_dictionary(syn["dictionary"])
    assert len(d) == 24
    labels, issues = read_list_file(syn["list_file"], len(d))
    assert len(labels) == 40 and not [i for i in issues if i.is_error]
    rep = validate_list(syn["list_file"], syn["root"], dictionary=syn["dictionary"], full_decode=True)
    assert rep.errors == [] and rep.num_samples == 40
    hold, _ = read_list_file(syn["holdout_list"], len(d))
    assert len(hold) == 10 and not set(hold.path(i) for i in range(10)) & set(labels.path(i) for i in range(40))


def test_labels_are_drawn_objects_plus_ancestors(syn):
    d = read_dictionary(syn["dictionary"])
    index = {n: i for i, n in enumerate(d.names)}
    labels, _ = read_list_file(syn["list_file"], len(d))
    confs = set()
    for i, rec in enumerate(_objects(syn["objects"])):
        assert labels.path(i) == rec["path"]
        leaves = {index[o[k]] for o in rec["objects"] for k in ("shape", "colour", "texture")}
        if len(rec["objects"]) >= 4:
            leaves.add(index["crowded scene"])
        expect = leaves | {a for leaf in leaves for a in d.ancestors(leaf)}
        got = labels.label_dict(i)
        assert set(got) == expect
        for k, c in got.items():  # an ancestor is at least as confident as each child
            for a in d.ancestors(k):
                assert got[a] >= c
        confs |= set(got.values())
    assert {1.0, 0.9, 0.8} <= {round(c, 3) for c in confs} <= {1.0, 0.9, 0.8}


def test_pixels_show_the_drawn_colours(syn):
    root = Path(syn["root"])
    checked = 0
    for rec in _objects(syn["objects"]):
        img = np.asarray(Image.open(root / rec["path"]).convert("RGB")).astype(float)
        assert img.shape[:2] == (rec["height"], rec["width"])
        assert 160 <= rec["width"] <= 256 and 120 <= rec["height"] <= 192
        for o in rec["objects"]:
            x, y = o["anchor"]
            patch = img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
            assert np.abs(patch - np.array(COLOURS[o["colour"]])).max() < 40, (rec["path"], o)
            checked += 1
    assert checked >= 40


def test_same_seed_same_data(tmp_path):
    a = make_synthetic(tmp_path / "a", 5, seed=9)
    b = make_synthetic(tmp_path / "b", 5, seed=9)
    c = make_synthetic(tmp_path / "c", 5, seed=10)
    assert Path(a["list_file"]).read_text() == Path(b["list_file"]).read_text()
    assert Path(a["list_file"]).read_text() != Path(c["list_file"]).read_text()
    assert (Path(a["root"]) / "train/000/0000004.jpg").read_bytes() == (Path(b["root"]) / "train/000/0000004.jpg").read_bytes()


def test_cli_make_synthetic_with_shards(tmp_path, capsys):
    rc = cli_main(["data", "make-synthetic", "--out", str(tmp_path / "d"), "--num-images", "6", "--seed", "1",
                   "--holdout", "2", "--shard-size", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and f"list_file: {tmp_path / 'd' / 'train.txt'}" in out and "--set data.list_file=" in out
    assert len(read_list_file(tmp_path / "d" / "holdout.txt", 24)[0]) == 2
    assert sorted(p.name for p in (tmp_path / "d" / "shards").iterdir()) == [
        "labels.npz", "manifest.json", "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar"]


def test_object_images_show_their_class_and_fill_the_frame():
    """The fine-tuning ImageFolder's images: one object, of the class's colour and texture, most of the frame."""
    for i in range(12):
        colour, texture = OBJECT_CLASSES[i % len(OBJECT_CLASSES)].split("-")
        img, objects = render_scene(np.random.default_rng([0, 2, i]), single=True, colour=colour, texture=texture)
        assert len(objects) == 1 and object_class(objects[0]) == f"{colour}-{texture}"
        o = objects[0]
        assert o["r"] >= 0.32 * min(img.shape[:2]) - 1e-6
        x, y = o["anchor"]
        patch = img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).astype(float).mean(0)
        assert np.abs(patch - np.array(COLOURS[colour])).max() < 40, (i, o)
        # stripes and dots darken part of the object; a plain object is its colour throughout
        inside = np.abs(img.astype(float) - np.array(COLOURS[colour])).max(-1) < 30
        dark = np.abs(img.astype(float) - 0.35 * np.array(COLOURS[colour])).max(-1) < 12
        assert (dark.sum() > 0.05 * inside.sum()) == (texture != "plain"), (i, texture)
