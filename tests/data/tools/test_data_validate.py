"""Bad inputs: each case reported with file and line; refusal, skip lists and skip_corrupt in the loader."""
import shutil
import tarfile

import numpy as np
import pytest
import torch

from images import jpeg_bytes
from hvpmtl.cli import main as cli_main
from hvpmtl.config import DataConfig
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.loaders.pretrain import build_pretrain_loader
from hvpmtl.data.tools.to_shards import write_shards
from hvpmtl.data.tools.validate import read_skip_list, validate_list, validate_shards

GOOD = 6


def _jpeg(rng, mode="RGB", fmt="JPEG") -> bytes:
    return jpeg_bytes(rng, 80, 64, mode, fmt)


# line number -> (list line, expected code, is error)
CASES = {}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    lines = []
    for i in range(GOOD):
        (root / f"img/good{i}.jpg").write_bytes(_jpeg(rng))
        lines.append(f"img/good{i}.jpg\t{i}:1\t7:0.9")
    full = _jpeg(rng)
    files = {"zero.jpg": b"", "trunc.jpg": full[: len(full) // 2], "png.jpg": _jpeg(rng, fmt="PNG"),
             "gif.jpg": _jpeg(rng, fmt="GIF"), "gray.jpg": _jpeg(rng, "L"), "cmyk.jpg": _jpeg(rng, "CMYK")}
    for name, data in files.items():
        (root / "img" / name).write_bytes(data)
    cases = [  # (line text, code)
        ("img/missing.jpg\t1:1", "missing-file"),
        ("img/zero.jpg\t1:1", "zero-byte"),
        ("img/trunc.jpg\t1:1", "truncated"),
        ("img/png.jpg\t1:1", "not-jpeg"),
        ("img/gif.jpg\t1:1", "not-jpeg"),
        ("img/gray.jpg\t2:1", "grayscale"),
        ("img/cmyk.jpg\t3:0.8", "cmyk"),
        ("img/good0.jpg\t12:1", "bad-index"),
        ("img/good1.jpg\t4-1", "malformed"),
        ("img/good2.jpg\t4:1.2", "bad-conf"),
        ("", "empty-line"),
        ("img/good3.jpg\t5:1", "duplicate-path"),
    ]
    # the bad-index/malformed/bad-conf lines reuse good files under new names so only the line is bad
    for k, (text, code) in enumerate(cases):
        if code in ("bad-index", "malformed", "bad-conf"):
            name = f"img/relabel{k}.jpg"
            shutil.copy(root / text.split("\t")[0], root / name)
            text = name + "\t" + text.split("\t")[1]
        lines.append(text)
        CASES[len(lines)] = code
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def validated(bad, tmp_path_factory):
    """The bad data set after `hvpmtl data validate`: its verdicts are in the data index."""
    root = tmp_path_factory.mktemp("validated") / "data"
    shutil.copytree(bad, root, ignore=shutil.ignore_patterns("*.hvpidx*"))
    validate_list(str(root / "train.txt"), str(root), num_classes=10)
    return root


def _cfg(root, **kw):
    return DataConfig(format="tencent", root=str(root), list_file=str(root / "train.txt"), num_classes=10,
                      img_size=32, mask_patch_size=16, num_threads=1, device="cpu", rand_augment_n=0, **kw)


def test_each_bad_case_is_reported_with_file_and_line(bad):
    rep = validate_list(str(bad / "train.txt"), str(bad), num_classes=10)
    got = {(i.line, i.code) for i in rep.issues}
    assert got == {(line, code) for line, code in CASES.items()}
    lst = str(bad / "train.txt")
    for i in rep.issues:
        assert i.format().startswith(f"{lst}:{i.line}: ")
    errors = {i.line for i in rep.errors}
    assert errors == {n for n, c in CASES.items() if c not in ("grayscale", "cmyk", "empty-line")}
    text = {i.code: i.format() for i in rep.issues}
    assert "PNG content" in text["not-jpeg"] or any("GIF content" in i.message for i in rep.issues)
    assert "missing.jpg not found" in text["missing-file"]
    assert "end-of-image" in text["truncated"]


def test_cli_validate_exit_code_and_skip_list(bad, tmp_path, capsys):
    skip = tmp_path / "skip.txt"
    rc = cli_main(["data", "validate", "--list", str(bad / "train.txt"), "--root", str(bad), "--num-classes", "10",
                   "--skip-list", str(skip)])
    out = capsys.readouterr().out
    assert rc == 1 and "errors" in out and "[truncated]" in out
    entries = read_skip_list(str(skip))
    assert {line for _, line in entries} == {n for n, c in CASES.items() if c not in ("grayscale", "cmyk", "empty-line")}
    good = tmp_path / "good.txt"
    good.write_text("img/good4.jpg 1:1\n")
    assert cli_main(["data", "validate", "--list", str(good), "--root", str(bad), "--num-classes", "10"]) == 0


def test_loader_refuses_naming_lines(validated):
    bad = validated
    with pytest.raises(DataError) as e:
        build_pretrain_loader(_cfg(bad), batch_size=2, patch_size=4, rank=0, world_size=1, local_rank=0, seed=0)
    msg = str(e.value)
    first_error = min(n for n, c in CASES.items() if c not in ("grayscale", "cmyk", "empty-line"))
    assert f"train.txt:{first_error}" in msg and "skip_list" in msg and "skip_corrupt" in msg
    assert "hvpmtl data validate" in msg


def test_skip_corrupt_skips_counts_and_decodes_gray_cmyk(validated):
    bad = validated
    loader = build_pretrain_loader(_cfg(bad, skip_corrupt=True), batch_size=3, patch_size=4, rank=0, world_size=1,
                                   local_rank=0, seed=0)
    n_err = sum(c not in ("grayscale", "cmyk", "empty-line") for c in CASES.values())
    assert loader.skipped_corrupt == n_err
    assert loader.num_samples == GOOD + 2  # + grayscale + CMYK, both usable
    paths = set()
    for b in loader:
        assert torch.isfinite(b["view1"]).all() and b["view1"].shape == (3, 3, 32, 32)
        paths |= {loader.labels.path(int(i)) for i in b["index"]}
    assert {"img/gray.jpg", "img/cmyk.jpg"} <= paths or len(paths) == 6  # 8 samples, 2 batches of 3


def test_skip_list_trusted_and_stale_skip_list_refused(bad, tmp_path):
    skip = tmp_path / "skip.txt"
    cli_main(["data", "validate", "--list", str(bad / "train.txt"), "--root", str(bad), "--num-classes", "10",
              "--skip-list", str(skip)])
    loader = build_pretrain_loader(_cfg(bad, skip_list=str(skip)), batch_size=2, patch_size=4, rank=0,
                                   world_size=1, local_rank=0, seed=0)
    assert loader.num_samples == GOOD + 2
    assert loader.skipped_corrupt == sum(c not in ("grayscale", "cmyk", "empty-line") for c in CASES.values())
    # a skip list without the malformed line is stale
    malformed = next(n for n, c in CASES.items() if c == "malformed")
    stale = tmp_path / "stale.txt"
    stale.write_text("\n".join(x for x in skip.read_text().splitlines() if f"\t{malformed}\t" not in x) + "\n")
    with pytest.raises(DataError, match=f"stale(.|\n)*train.txt:{malformed}"):
        build_pretrain_loader(_cfg(bad, skip_list=str(stale)), batch_size=2, patch_size=4, rank=0, world_size=1,
                              local_rank=0, seed=0)


def test_undetected_bad_image_names_the_file_not_a_bare_dali_error(bad, tmp_path):
    # a skip list is trusted without a scan: leave the truncated image out of it and it reaches DALI
    skip = tmp_path / "skip.txt"
    cli_main(["data", "validate", "--list", str(bad / "train.txt"), "--root", str(bad), "--num-classes", "10",
              "--skip-list", str(skip)])
    trunc = next(n for n, c in CASES.items() if c == "truncated")
    skip.write_text("\n".join(x for x in skip.read_text().splitlines() if f"\t{trunc}\t" not in x) + "\n")
    loader = build_pretrain_loader(_cfg(bad, skip_list=str(skip)), batch_size=9, patch_size=4, rank=0,
                                   world_size=1, local_rank=0, seed=0)
    with pytest.raises(DataError, match=f"train.txt:{trunc} \\(img/trunc.jpg\\)"):
        for _ in loader:
            pass


def test_shards_empty_shard_reported_refused_and_skipped(bad, tmp_path):
    lst = tmp_path / "ok.txt"
    lst.write_text("".join(f"img/good{i}.jpg\t{i}:1\n" for i in range(GOOD)))
    out = tmp_path / "shards"
    write_shards(str(lst), str(bad), str(out), 3, num_classes=10)
    assert validate_shards(str(out)).errors == []
    with tarfile.open(out / "shard-000001.tar", "w"):
        pass  # now empty, its index stale
    cfg = DataConfig(format="shards", shards=str(out), num_classes=10, img_size=32, mask_patch_size=16,
                     num_threads=1, device="cpu", rand_augment_n=0)
    with pytest.raises(DataError, match="stale(.|\n)*index-shards"):
        build_pretrain_loader(cfg, batch_size=1, patch_size=4, rank=0, world_size=1, local_rank=0, seed=0)
    assert "stale" in validate_shards(str(out)).errors[0].message
    assert cli_main(["data", "index-shards", str(out)]) == 0
    rep = validate_shards(str(out))
    # the emptied shard's 3 samples are lost (errors, as training counts them) and the shard is empty
    assert sorted((i.code, i.file) for i in rep.errors) == ([("bad-shard", "shard-000001.tar")] * 3
                                                            + [("empty-shard", "shard-000001.tar")])
    with pytest.raises(DataError, match="shard-000001.tar: error \\[empty-shard\\]"):
        build_pretrain_loader(cfg, batch_size=1, patch_size=4, rank=0, world_size=1, local_rank=0, seed=0)
    cfg.skip_corrupt = True
    loader = build_pretrain_loader(cfg, batch_size=1, patch_size=4, rank=0, world_size=1, local_rank=0, seed=0)
    assert len(loader) == 3 and len([b for b in loader]) == 3


def test_corrupt_member_in_shard_is_filtered_from_the_index(bad, tmp_path):
    lst = tmp_path / "ok.txt"
    lst.write_text("".join(f"img/good{i}.jpg\t{i}:1\n" for i in range(GOOD)))
    out = tmp_path / "shards"
    write_shards(str(lst), str(bad), str(out), 6, num_classes=10)
    tar = out / "shard-000000.tar"
    first_jpg = next(m for m in tarfile.open(tar) if m.name.endswith(".jpg"))
    data = bytearray(tar.read_bytes())
    data[first_jpg.offset_data:first_jpg.offset_data + 4] = b"\x89PNG"  # no longer a JPEG
    tar.write_bytes(bytes(data))
    rep = validate_shards(str(out))
    assert [(i.code, i.line) for i in rep.errors] == [("not-jpeg", 1)]
    cfg = DataConfig(format="shards", shards=str(out), num_classes=10, img_size=32, mask_patch_size=16,
                     num_threads=1, device="cpu", rand_augment_n=0, skip_corrupt=True)
    loader = build_pretrain_loader(cfg, batch_size=5, patch_size=4, rank=0, world_size=1, local_rank=0, seed=0)
    assert loader.skipped_corrupt == 1 and loader.num_samples == 5
    (b,) = list(loader)
    bad_id = int(first_jpg.name.split(".")[0])
    kept = sorted(loader.labels.path(int(i)) for i in b["index"])
    assert kept == sorted(f"img/good{i}.jpg" for i in range(GOOD) if i != bad_id)
