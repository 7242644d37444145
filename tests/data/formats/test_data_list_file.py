"""List and dictionary parsing: formats, issues with file:line, CSR packing."""
import numpy as np
import pytest

from hvpmtl.data.formats.dictionary import Dictionary, read_dictionary, write_dictionary
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.formats.list_file import read_list_file, write_list_file


def test_list_file_tabs_spaces_and_labels(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("a/1.jpg\t3:1\t0:0.9\n"
                 "b/2.jpg  5:0.8 1:1\n"
                 "c/3.jpg\n")
    labels, issues = read_list_file(p, num_classes=6)
    assert len(labels) == 3
    assert [labels.path(i) for i in range(3)] == ["a/1.jpg", "b/2.jpg", "c/3.jpg"]
    assert labels.label_dict(0) == {0: pytest.approx(0.9), 3: 1.0}
    assert labels.label_dict(1) == {1: 1.0, 5: pytest.approx(0.8)}
    assert labels.label_dict(2) == {}
    assert labels.lines.tolist() == [1, 2, 3]
    assert [(i.code, i.line) for i in issues] == [("no-labels", 3)]


@pytest.mark.parametrize("line,code", [
    ("x.jpg 7:1", "bad-index"),
    ("x.jpg -1:1", "bad-index"),
    ("x.jpg 2", "malformed"),
    ("x.jpg a:1", "malformed"),
    ("x.jpg 2:", "malformed"),
    ("x.jpg 2:high", "malformed"),
    ("x.jpg 2:0", "bad-conf"),
    ("x.jpg 2:1.5", "bad-conf"),
    ("x.jpg 2:nan", "bad-conf"),
    ("   ", "empty-line"),
])
def test_bad_lines_named_by_file_and_line(tmp_path, line, code):
    p = tmp_path / "l.txt"
    p.write_text(f"ok.jpg 1:1\n{line}\nok2.jpg 0:1\n")
    labels, issues = read_list_file(p, num_classes=6)
    assert [labels.path(i) for i in range(len(labels))] == ["ok.jpg", "ok2.jpg"]
    assert [(i.code, i.line) for i in issues] == [(code, 2)]
    assert issues[0].format().startswith(f"{p}:2: ")


def test_duplicate_path_keeps_first_line(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("a.jpg 1:1\nb.jpg 2:1\na.jpg 3:1\n")
    labels, issues = read_list_file(p, num_classes=6)
    assert len(labels) == 2 and labels.label_dict(0) == {1: 1.0}
    assert [(i.code, i.line, i.is_error) for i in issues] == [("duplicate-path", 3, True)]
    assert "already on line 1" in issues[0].message


def test_subset_repacks_labels(tmp_path):
    rng = np.random.default_rng(0)
    entries = [(f"{i}.jpg", {int(k): 1.0 for k in rng.choice(20, rng.integers(0, 5), replace=False)})
               for i in range(30)]
    p = tmp_path / "l.txt"
    write_list_file(p, entries)
    labels, _ = read_list_file(p, 20)
    keep = np.array([0, 3, 4, 17, 29])
    sub = labels.subset(keep)
    for j, i in enumerate(keep):
        assert sub.path(j) == entries[i][0]
        assert sub.label_dict(j) == entries[i][1]
        assert sub.lines[j] == i + 1


def test_dictionary_roundtrip_commas_and_ancestors(tmp_path):
    d = Dictionary(["n1", "n2", "n3"], ["animal, beast", "dog", "puppy, young dog"], np.array([-1, 0, 1]))
    p = tmp_path / "dict.txt"
    write_dictionary(p, d)
    assert p.read_text().splitlines()[0] == "category_index\tcategory_id\tindex_of_parent_category\tcategory name"
    r = read_dictionary(p)
    assert r.names == d.names and r.ids == d.ids and r.parents.tolist() == [-1, 0, 1]
    assert r.ancestors(2) == [1, 0] and r.ancestors(0) == []


@pytest.mark.parametrize("rows,msg", [
    (["0\tn0\t-1\troot", "1\tn1\t5\tx"], "parent 5"),
    (["0\tn0\t1\ta", "1\tn1\t0\tb"], "cycle"),
    (["0\tn0\t-1\troot", "2\tn2\t0\tx"], "expected 1"),
    (["0\tn0 -1 root"], "columns"),
])
def test_bad_dictionary(tmp_path, rows, msg):
    p = tmp_path / "dict.txt"
    p.write_text("category_index\tcategory_id\tindex_of_parent_category\tcategory name\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=msg):
        read_dictionary(p)


def _random_list(rng, n, bad_every=0):
    lines = []
    for i in range(n):
        ks = rng.choice(30, rng.integers(0, 6), replace=False)
        toks = [f"{k}:{rng.choice(['1', '0.9', '0.8'])}" for k in ks]
        path = f"d/{rng.integers(0, n // 2) if i % 7 == 3 else i}.jpg"  # some duplicate paths
        if bad_every and i % bad_every == 1:
            toks.append(rng.choice(["4-1", "1:2:3", "x:1", "31:1", "2:0", "", "5:1 5:0.8"]))
        sep = "\t" if i % 2 else "  "
        lines.append(sep.join([path, *toks]))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("bad_every", [0, 5])
def test_vectorised_parse_matches_per_line_parse(tmp_path, monkeypatch, bad_every):
    import hvpmtl.data.formats.list_parse as t
    p = tmp_path / "l.txt"
    p.write_text(_random_list(np.random.default_rng(bad_every), 400, bad_every))
    monkeypatch.setattr(t, "BLOCK_BYTES", 256)  # many blocks, of both kinds when some lines are bad
    fast, fast_issues = read_list_file(p, 30)
    monkeypatch.setattr(t, "_fast_lines", lambda *a: None)  # every line through the per-line parser
    slow, slow_issues = read_list_file(p, 30)
    assert fast.path_blob == slow.path_blob and np.array_equal(fast.path_offsets, slow.path_offsets)
    for k in ("lines", "indptr", "classes", "confs"):
        assert np.array_equal(getattr(fast, k), getattr(slow, k)), k
    assert [(i.code, i.line, i.message) for i in fast_issues] == [(i.code, i.line, i.message) for i in slow_issues]
    assert any(i.code == "duplicate-path" for i in slow_issues)
    if bad_every:
        assert {"malformed", "bad-index", "bad-conf"} <= {i.code for i in slow_issues}


ODD_TOKENS = ["1e-1", "+1", "007", ".5", "1.", "0x1", "1_0", "1e2", "1E2", "inf", "nan", "-0", "0.9", "1.0e0",
              "٣", "1:1", "", "12345678901234567890", "2147483648", "0.25", "1e+3", "1.0e4"]


def _odd_list(rng, n) -> bytes:
    """Lines mixing the released format with every shape the vectorised parser must hand over."""
    out = []
    for i in range(n):
        path = rng.choice([f"d/{i}.jpg", f"d/{i}:x.jpg", f"/abs/{i}.jpg", f"../{i}.jpg", f"a/../{i}.jpg",
                           f"d/\udcff{i}.jpg", f"d/caf\u00e9{i}.jpg", f"d/{i % 5}.jpg"], p=[.5, .05, .05, .05, .05,
                                                                                         .1, .1, .1])
        toks = [f"{rng.integers(0, 12)}:{rng.choice(['1', '0.9', '0.8'])}" for _ in range(rng.integers(0, 4))]
        if rng.random() < 0.4:
            a, b = rng.choice(ODD_TOKENS, 2)
            toks.append(rng.choice([f"{a}:{b}", f"{a}:1", f"3:{b}", f"{a}"]))
        sep = rng.choice(["\t", " ", "  ", " \t"])
        line = sep.join([path, *toks]).encode("utf-8", "surrogateescape")
        out.append(line + rng.choice([b"\n", b"\r\n", b"\t\n", b"\n\n"]))
    return b"".join(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_parse_agrees_on_odd_shapes(tmp_path, monkeypatch, seed):
    import hvpmtl.data.formats.list_parse as t
    p = tmp_path / "l.txt"
    p.write_bytes(_odd_list(np.random.default_rng(seed), 300))
    monkeypatch.setattr(t, "BLOCK_BYTES", 512)
    fast, fast_issues = read_list_file(p, 10)
    monkeypatch.setattr(t, "_fast_lines", lambda *a: None)
    slow, slow_issues = read_list_file(p, 10)
    assert fast.path_blob == slow.path_blob and len(fast) > 100
    for k in ("lines", "indptr", "classes", "confs"):
        assert np.array_equal(getattr(fast, k), getattr(slow, k)), k
    assert [(i.code, i.line, i.message) for i in fast_issues] == [(i.code, i.line, i.message) for i in slow_issues]
    codes = {i.code for i in slow_issues}
    assert {"bad-path", "non-utf8-path", "malformed", "bad-index", "duplicate-path"} <= codes


def test_a_latin1_dictionary_is_named_by_file_and_line(tmp_path):
    """Issue 23: a dictionary saved as Latin-1 was a UnicodeDecodeError traceback in index, validate and training."""
    from hvpmtl.data.formats.dictionary import read_dictionary
    from hvpmtl.data.formats.issues import DataError

    p = tmp_path / "dictionary.txt"
    p.write_bytes(b"category_index\tcategory_name\tparent_index\tname\n0\tn0\t-1\tcat\n1\tn1\t-1\tcaf\xe9\n")
    with pytest.raises(DataError, match=rf"{p}:3: error \[bad-dictionary\]: not UTF-8 \(byte 0xe9\)"):
        read_dictionary(p)
