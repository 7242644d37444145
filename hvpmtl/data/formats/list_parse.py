"""The list-file parser: the one path from a list file's bytes to its usable rows and issues.

List file: one image per line, whitespace separated (TABs in the released Tencent ML-Images files):
    path<TAB>idx:conf<TAB>idx:conf ...
idx is a 0-based class index, conf in (0, 1] (1, 0.9 and 0.8 occur). Paths are relative to an
image root and hold no whitespace.

iter_list_blocks parses the lines, list_issues adds what only the whole list shows (duplicate paths, no
samples): read_list_file (list_file.py) and the data index (index_build.py) both run these two.
"""
from __future__ import annotations

import dataclasses
import math
import os
import posixpath
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hvpmtl.data.formats.issues import DataError, Issue, make_issue


def csr_take(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(new indptr, positions to gather) for the rows `rows` of a CSR layout, in that order."""
    rows = np.asarray(rows, np.int64)
    counts = (indptr[rows + 1] - indptr[rows]).astype(np.int64)
    new = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(counts, out=new[1:])
    # position j of the new arrays reads old position start[row] + (j - new[row's slot])
    take = np.repeat(indptr[rows].astype(np.int64) - new[:-1], counts) + np.arange(new[-1], dtype=np.int64)
    return new, take


def parse_label(token: str) -> tuple[int, float]:
    """'12:0.9' -> (12, 0.9); ValueError when malformed."""
    idx_s, sep, conf_s = token.partition(":")
    if not sep or not idx_s or not conf_s:
        raise ValueError(f"label '{token}' is not idx:conf")
    try:
        return int(idx_s), float(conf_s)
    except ValueError:
        raise ValueError(f"label '{token}' is not idx:conf with an integer idx and a number conf") from None


class _LineIssue(Exception):
    def __init__(self, code: str, detail: str):
        self.code, self.detail = code, detail


def path_problem(p: bytes) -> str:
    """Why a list path cannot be used under the image root ('' when it can)."""
    if b"\x00" in p:
        return "NUL byte in the path"
    if p.startswith(b"/"):
        return "absolute path"
    norm = posixpath.normpath(p)
    if norm == b".." or norm.startswith(b"../"):
        return "the path climbs out of the image root"
    return ""


def norm_path(p: bytes) -> bytes:
    """The path as the duplicate check compares it: `./x.jpg`, `a//x.jpg` and `a/b/../x.jpg` name the
    file that `x.jpg`, `a/x.jpg` and `a/x.jpg` name (normpath only where such a part occurs)."""
    if b"./" in p or b"//" in p or p.endswith(b"/.") or p.endswith(b"/"):
        return posixpath.normpath(p)
    return p


def _slow_line(line: bytes, n: int, src: str, num_classes: int | None, issues: list):
    """(path, {class: conf}) of one line, or None with its issue appended. The reference parser: the
    vectorised one must agree with it on every line it accepts."""
    parts = line.split()
    if not parts:
        issues.append(make_issue("empty-line", src, n))
        return None
    p = parts[0]
    ptxt = p.decode(errors="backslashreplace")
    why = path_problem(p)
    if why:
        issues.append(make_issue("bad-path", src, n, why, ptxt))
        return None
    try:
        p.decode()
    except UnicodeDecodeError as e:
        issues.append(make_issue("non-utf8-path", src, n, f"byte 0x{p[e.start]:02x} at {e.start}", ptxt))
    labels: dict[int, float] = {}
    try:
        for tok in parts[1:]:
            t = tok.decode(errors="replace")
            k, c = parse_label(t)
            if num_classes is not None and not 0 <= k < num_classes:
                raise _LineIssue("bad-index", f"class index {k} in '{t}' not in [0, {num_classes})")
            if k < 0:
                raise _LineIssue("bad-index", f"class index {k} in '{t}' is negative")
            if k >= 2**31:
                raise _LineIssue("bad-index", f"class index {k} in '{t}' does not fit in 32 bits")
            if not (0.0 < c <= 1.0) or math.isnan(c):
                raise _LineIssue("bad-conf", f"confidence {c} in '{t}' not in (0, 1]")
            if k in labels:
                issues.append(make_issue("duplicate-label", src, n, f"class {k} listed twice", ptxt))
                c = max(c, labels[k])
            labels[k] = c
    except ValueError as e:
        issues.append(make_issue("malformed", src, n, str(e), ptxt))
        return None
    except _LineIssue as e:
        issues.append(make_issue(e.code, src, n, e.detail, ptxt))
        return None
    return p, labels


# ----------------------------------------------------------------------------- the vectorised parser
#
# A block of whole lines is parsed with a few numpy passes over its bytes and pyarrow string kernels
# over its tokens (no Python loop over lines): separators (whitespace and ':') become TABs, one
# split gives every token, a token's neighbours tell path / class index / confidence apart, and the
# numbers come from pyarrow's casts. A line that anything looks odd in (a malformed or out-of-range
# label, a class twice, a path that is absolute, climbs out of the root, holds a ':' or non-ASCII
# bytes, an empty line) goes to _slow_line, which writes its message: the per-line parser runs on
# those lines only. Blocks are parsed by a few threads (numpy and pyarrow release the GIL).

BLOCK_BYTES = 4 << 20
PARSE_THREADS = min(8, os.cpu_count() or 1)
TAB, NL, CR, COLON, SLASH, DOT = 9, 10, 13, 58, 47, 46
_NUMBER_RE = r"^(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})$"


@dataclass
class ParsedBlock:
    """The usable lines of a block, in line order (CSR labels sorted by class within a line)."""
    paths: pa.Array  # binary
    lines: np.ndarray  # int64, 1-based
    counts: np.ndarray  # int64 labels per line
    classes: np.ndarray  # int32
    confs: np.ndarray  # float32
    issues: list
    num_lines: int
    hashes: np.ndarray = None  # uint64 per path (find_duplicates)
    conf_values: np.ndarray = None  # the distinct confidences of the block, sorted
    conf_codes: np.ndarray = None  # each label's position in conf_values (uint16)


def _numbers(text: pa.Array, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, parsed) of number tokens. pyarrow's cast parses as float() does on the forms both
    accept (correctly rounded); a token it refuses (and, to find it, any other token of a form outside
    `pattern`) is marked unparsed and its line goes to the per-line parser."""
    try:
        return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False), np.ones(len(text), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ok = np.asarray(pc.fill_null(pc.match_substring_regex(text, pattern), False), bool)
        out = np.zeros(len(text), np.float64)
        try:
            out[ok] = pc.cast(text.filter(pa.array(ok)), pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            ok[:] = False
        return out, ok


def _fast_lines(buf: np.ndarray, breaks: np.ndarray, num_classes: Optional[int]):
    """Vectorised parse of the lines of `buf` (line j ends at breaks[j]). Returns (slow, toks,
    path_tok, counts, classes, confs): slow[j] sends line j to the per-line parser; the other lines'
    path tokens (indices into toks), label counts and labels sorted by class within a line."""
    n, L = len(buf), len(breaks)
    x = buf.copy()
    x[breaks[breaks < n]] = TAB
    colons = np.flatnonzero(buf == COLON)
    x[colons] = TAB
    if np.count_nonzero(buf == 32):
        x[buf == 32] = TAB
    if np.count_nonzero((buf >= 11) & (buf <= 13)):
        x[(buf >= 11) & (buf <= 13)] = TAB
    whole = pa.Array.from_buffers(pa.binary(), 1, [None, pa.py_buffer(np.array([0, n], np.int32)), pa.py_buffer(x)])
    toks = pc.split_pattern(whole, "\t").values
    toff = np.frombuffer(toks.buffers()[1], np.int32)[toks.offset:toks.offset + len(toks) + 1]
    k = np.arange(len(toks), dtype=np.int32)
    ts, te = toff[:-1] + k, toff[1:] + k  # token spans in buf: one separator dropped before each
    ne = None  # the non-empty tokens, when some are empty (runs of separators; the block's final '\n')
    if len(ts) and te[-1] == ts[-1]:
        ts, te = ts[:-1], te[:-1]
    if not (te > ts).all():
        ne = np.flatnonzero(te > ts)
        ts, te = ts[ne], te[ne]
    if ne is None and len(ts) and ts[0] == 0:
        # one separator between tokens: a token's line counts the line ends after the tokens before it
        after_sep = buf[te[:-1]]
        tl = np.zeros(len(ts), np.int64)
        np.cumsum((after_sep == NL) | (after_sep == CR), out=tl[1:])
    else:  # runs of separators, empty lines: where each token falls among the line ends
        tl = np.searchsorted(breaks.astype(np.int32), ts)  # blocks are far below 2 GiB
    slow = np.zeros(L + 1, bool)
    first = np.ones(len(ts), bool)
    first[1:] = tl[1:] != tl[:-1]
    has_tok = np.zeros(L + 1, bool)
    has_tok[tl] = True
    slow |= ~has_tok
    if len(colons):  # a ':' needs token bytes on both sides
        left, right = colons - 1, colons + 1
        okc = (left >= 0) & (right < n)
        okc[okc] = (x[left[okc]] != TAB) & (x[right[okc]] != TAB)
        slow[np.searchsorted(breaks, colons[~okc])] = True
    before = (ts > 0) & (buf[np.maximum(ts - 1, 0)] == COLON)
    after = (te < n) & (buf[np.minimum(te, n - 1)] == COLON)
    # a path token has no ':' beside it; a label token is 'idx' before one or 'conf' after one
    slow[tl[np.where(first, before | after, before == after)]] = True
    slow[tl[first][buf[ts[first]] == SLASH]] = True
    slow[np.searchsorted(breaks, np.flatnonzero((buf[:-1] == DOT) & (buf[1:] == DOT)))] = True
    # './' and '//' (and so '/./'): the per-line parser normalises the path for the duplicate check
    slow[np.searchsorted(breaks, np.flatnonzero(((buf[:-1] == DOT) | (buf[:-1] == SLASH)) & (buf[1:] == SLASH)))] = True
    if n and (buf.max() >= 0x80 or buf.min() == 0):
        slow[np.searchsorted(breaks, np.flatnonzero((buf >= 0x80) | (buf == 0)))] = True
    lab = np.flatnonzero(~first & ~slow[tl])  # idx, conf, idx, conf, ... in the lines still fast
    if len(lab) % 2 or not (after[lab[0::2]].all() and before[lab[1::2]].all()):
        slow[:] = True  # cannot happen when the checks above hold; never guess
        lab = lab[:0]
    rows = tl[lab[0::2]]
    pick = np.zeros(len(toks), bool)
    pick[lab if ne is None else ne[lab]] = True
    text = toks.filter(pa.array(pick))
    try:
        text = text.view(pa.string()) if n and buf.max() < 0x80 else text.cast(pa.string())  # ASCII: valid
        digits = np.asarray(pc.ascii_is_decimal(text), bool)[0::2]  # int() takes these, with these values
    except pa.ArrowInvalid:  # not UTF-8: cannot be in a line still fast (non-ASCII bytes went slow)
        slow[:] = True
        text, rows, digits = text[:0].cast(pa.string()), rows[:0], np.zeros(0, bool)
    val, ok = _numbers(text, _NUMBER_RE)
    idx, conf = val[0::2], val[1::2]
    limit = 2**31 if num_classes is None else min(num_classes, 2**31)
    bad = ~digits | ~ok[0::2] | ~ok[1::2] | ~(idx < limit) | ~((conf > 0) & (conf <= 1))
    slow[rows[bad]] = True
    idx = np.where(bad, 0, idx).astype(np.int64)
    key = (rows.astype(np.int64) << 32) | idx
    if len(key) > 1 and not (key[1:] > key[:-1]).all():  # labels sorted by class within a line
        order = np.argsort(key)  # keys are unique but in lines with a class twice, which go slow anyway
        key, rows, idx, conf = key[order], rows[order], idx[order], conf[order]
        slow[rows[1:][key[1:] == key[:-1]]] = True  # a class twice: the per-line parser reports it
    keep = ~slow[rows]
    rows, idx, conf = rows[keep], idx[keep], conf[keep]
    slow = slow[:L]
    path_tok = np.flatnonzero(first)[~slow[tl[first]]]
    if ne is not None:
        path_tok = ne[path_tok]
    counts = np.bincount(rows, minlength=L)[~slow]
    return slow, toks, path_tok, counts, idx.astype(np.int32), conf.astype(np.float32)


def _line_breaks(buf: np.ndarray, final: bool) -> np.ndarray:
    """End positions of the block's lines as bytes.splitlines() cuts them: '\\n', '\\r\\n' (its '\\r'
    is then whitespace in the line) and a lone '\\r'; the last line of the file may have no end."""
    breaks = np.flatnonzero(buf == NL)
    if np.count_nonzero(buf == CR):
        cr = np.flatnonzero(buf == CR)
        nxt = np.minimum(cr + 1, len(buf) - 1)
        lone = cr[(cr + 1 >= len(buf)) | (buf[nxt] != NL)]
        if len(lone):
            breaks = np.union1d(breaks, lone)
    if final and len(buf) and (not len(breaks) or breaks[-1] != len(buf) - 1):
        breaks = np.append(breaks, len(buf))
    return breaks


def _parse_block(block: bytes, first_line: int, src: str, num_classes: Optional[int], final: bool) -> ParsedBlock:
    buf = np.frombuffer(block, np.uint8)
    breaks = _line_breaks(buf, final)
    L = len(breaks)
    fast = _fast_lines(buf, breaks, num_classes) if L else None
    if fast is None:  # everything through the per-line parser (tests use this as the reference)
        slow = np.ones(L, bool)
        paths, counts, classes, confs = pa.array([], pa.binary()), np.zeros(0, np.int64), \
            np.zeros(0, np.int32), np.zeros(0, np.float32)
    else:
        slow, toks, path_tok, counts, classes, confs = fast
        paths = toks.take(pa.array(path_tok))
    hash_paths = paths  # the paths the duplicate check hashes: normalised where the per-line parser saw them
    lines = np.flatnonzero(~slow).astype(np.int64) + first_line
    issues: list[Issue] = []
    slow_rows = np.flatnonzero(slow)
    if len(slow_rows):
        starts = np.concatenate([[0], breaks[:-1] + 1])
        s_paths, s_lines, s_counts, s_cls, s_conf = [], [], [], [], []
        for j in slow_rows.tolist():  # only the lines that need a message or a rare shape
            r = _slow_line(block[starts[j]:breaks[j]], first_line + j, src, num_classes, issues)
            if r is None:
                continue
            s_paths.append(r[0])
            s_lines.append(first_line + j)
            s_counts.append(len(r[1]))
            for c in sorted(r[1]):
                s_cls.append(c)
                s_conf.append(r[1][c])
        if s_lines:
            all_lines = np.concatenate([lines, np.asarray(s_lines, np.int64)])
            order = np.argsort(all_lines, kind="stable")
            all_counts = np.concatenate([counts, np.asarray(s_counts, np.int64)])
            indptr = np.zeros(len(all_counts) + 1, np.int64)
            np.cumsum(all_counts, out=indptr[1:])
            new_indptr, take = csr_take(indptr, order)
            classes = np.concatenate([classes, np.asarray(s_cls, np.int32)])[take]
            confs = np.concatenate([confs, np.asarray(s_conf, np.float32)])[take]
            hash_paths = pa.concat_arrays([paths, pa.array([norm_path(x) for x in s_paths], pa.binary())]).take(
                pa.array(order))
            paths = pa.concat_arrays([paths, pa.array(s_paths, pa.binary())]).take(pa.array(order))
            lines, counts = all_lines[order], all_counts[order]
    values, codes = np.unique(confs, return_inverse=True)
    return ParsedBlock(paths, lines, np.asarray(counts, np.int64), classes, confs, issues, L, path_hashes(hash_paths),
                       values, codes.astype(np.uint16) if len(values) <= 65536 else None)


def iter_list_blocks(path: str | Path, num_classes: Optional[int] = None, *, block_bytes: Optional[int] = None,
                     threads: Optional[int] = None,
                     on_read: Optional[Callable[[bytes], None]] = None) -> Iterator[ParsedBlock]:
    """Parse a list file block by block, in order, with a few threads; `on_read` sees every byte read
    (hashing, progress). Memory: a few blocks at a time."""
    src = str(path)
    block_bytes = block_bytes or BLOCK_BYTES
    threads = threads or PARSE_THREADS
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read list file {src}: {e.strerror}") from None
    # the reading thread only reads and hands out blocks: lines are numbered within a block and shifted
    # here, in order; `on_read` (a sha256 of the file) runs in a thread of its own, in order too
    with f, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hvpmtl-parse") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hvpmtl-hash") as hasher:
        pending: deque = deque()
        carry, line = b"", 1
        seen = None
        while True:
            chunk = f.read(block_bytes)
            if on_read is not None and chunk:
                if seen is not None:
                    seen.result()  # at most one chunk waits for the hash
                seen = hasher.submit(on_read, chunk)
            final = not chunk
            data = carry + chunk if carry else chunk
            if final:
                block, carry = data, b""
            else:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no '\n' yet: a lone '\r' ends a line too (not the last byte: '\r\n' may follow)
                    cut = data.rfind(b"\r", 0, len(data) - 1) + 1
                block, carry = data[:cut], data[cut:]
            if block:
                pending.append(pool.submit(_parse_block, block, 1, src, num_classes, final))
            while pending and (len(pending) >= threads or final):  # at most `threads` blocks in memory
                b = pending.popleft().result()
                if line != 1:
                    b.lines += line - 1
                    b.issues = [dataclasses.replace(i, line=i.line + line - 1) for i in b.issues]
                line += b.num_lines
                yield b
            if final:
                if seen is not None:
                    seen.result()
                return


_HASH_BASE = 0x100000001B3  # FNV's prime: an odd multiplier for the polynomial hash
_POW = np.ones(1, np.uint64)


def _powers(n: int) -> np.ndarray:
    """_HASH_BASE**i mod 2**64 for i < n (grown on demand)."""
    global _POW
    if len(_POW) < n:
        p = np.empty(max(n, 2 * len(_POW)), np.uint64)
        p[0] = 1
        for i in range(1, len(p)):  # once per process, a few thousand entries
            p[i] = (int(p[i - 1]) * _HASH_BASE) & (2**64 - 1)
        _POW = p
    return _POW[:n]


def path_hashes(paths: pa.Array) -> np.ndarray:
    """A 64-bit hash of each path (a polynomial over its bytes, mixed with its length): vectorised, so
    the duplicate check sorts 8 bytes per line instead of hashing strings in one thread."""
    n = len(paths)
    if not n:
        return np.zeros(0, np.uint64)
    arr = paths.cast(pa.large_binary())
    off = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8)[off[0]:off[-1]] if arr.buffers()[2] is not None else \
        np.zeros(0, np.uint8)
    off = off - off[0]
    lens = np.diff(off)
    rel = np.arange(len(data), dtype=np.int64) - np.repeat(off[:-1], lens)
    contrib = data.astype(np.uint64) * _powers(int(lens.max()) + 1 if n else 1)[rel]
    h = np.zeros(n, np.uint64)
    nz = lens > 0
    if len(data):
        h[nz] = np.add.reduceat(contrib, off[:-1][nz])
    h ^= lens.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)  # spread the low bits a little; equal hashes are checked byte by byte anyway
    return h


def find_duplicates(hashes: np.ndarray, path_of) -> tuple[np.ndarray, np.ndarray]:
    """(rows that repeat an earlier row's path, the row each repeats): a stable sort of the 64-bit path
    hashes, then equal neighbours compared byte by byte (`path_of(row)`), so a hash collision never
    drops a line."""
    if len(hashes) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(hashes)  # rows of equal hash are put back in row order below
    hs = hashes[order]
    same = np.flatnonzero(hs[1:] == hs[:-1])
    if not len(same):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    dup, first = [], []
    starts = same[np.concatenate([[True], same[1:] != same[:-1] + 1])]
    ends = same[np.concatenate([same[1:] != same[:-1] + 1, [True]])] + 2
    for a, b in zip(starts.tolist(), ends.tolist()):  # groups of rows whose hash repeats: duplicates, or a collision
        seen: dict = {}
        for r in sorted(order[a:b].tolist()):
            p = path_of(r)
            if p in seen:
                dup.append(r)
                first.append(seen[p])
            else:
                seen[p] = r
    dup_a, first_a = np.asarray(dup, np.int64), np.asarray(first, np.int64)
    o = np.argsort(dup_a, kind="stable")
    return dup_a[o], first_a[o]


def list_issues(src: str, line_issues: list[Issue], num_lines: int, lines: np.ndarray, hashes: np.ndarray,
                raw_path: Callable[[int], bytes]) -> tuple[np.ndarray, list[Issue]]:
    """(rows to keep, every issue of the list sorted by line): the lines' own issues, a path repeated on a
    later line (that row is left out) and a list without samples. `raw_path(row)`: the path as written."""
    issues = list(line_issues)
    keep = np.ones(len(lines), bool)
    dup, first = find_duplicates(hashes, lambda r: norm_path(raw_path(r)))
    for r, f in zip(dup.tolist(), first.tolist()):
        issues.append(make_issue("duplicate-path", src, int(lines[r]), f"already on line {int(lines[f])}",
                                 raw_path(r).decode(errors="backslashreplace")))
    keep[dup] = False
    if num_lines == 0 or (not keep.any() and not any(i.is_error for i in issues)):
        issues.append(make_issue("empty-list", src, 0, "0 samples"))
    issues.sort(key=lambda i: i.line)
    return keep, issues


def no_label_issues(src: str, rows: np.ndarray, lines: np.ndarray, raw_path: Callable[[int], bytes]) -> list[Issue]:
    """A `no-labels` warning for each of `rows`: a check of the parsed rows, not of the parse (the data index
    does not store it; read_list_file and the validator report it)."""
    return [make_issue("no-labels", src, int(lines[r]), "", raw_path(r).decode(errors="backslashreplace"))
            for r in np.asarray(rows, np.int64).tolist()]
