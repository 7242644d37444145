"""Writing the data index (the format: index_format.py): one record batch over the arrays' buffers (no copy),
sealed with its sha256, renamed over the old file (hvpmtl.fileio.atomic_file)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa

from hvpmtl.data.formats.index_format import (FORMAT, KEY_FORMAT, KEY_HEADER, KEY_ISSUES, KEY_SHA256, SHA_BLANK,
                                              VERDICTS, checksum_digest, checksum_spots, labels_type, Streamed,
                                              temp_name)
from hvpmtl.fileio import atomic_file


def _arrow_buffer(name: str, a, spill: Callable[[], Path]) -> tuple[np.dtype, int, pa.Buffer]:
    """(dtype, length, an Arrow buffer of the values): numpy arrays (memory maps included) without a copy; a
    Streamed array through a file in `spill()`, mapped, so that it is never whole in memory."""
    if not isinstance(a, Streamed):
        a = np.ascontiguousarray(a).reshape(-1)
        return a.dtype, a.size, pa.py_buffer(a)
    p = spill() / name
    n = 0
    with open(p, "wb") as f:
        for c in a.chunks():
            c = np.ascontiguousarray(c, a.dtype)
            f.write(memoryview(c).cast("B"))
            n += c.size
    if n != a.length:
        raise RuntimeError(f"index array {name}: wrote {n} of {a.length} values")
    return a.dtype, n, pa.memory_map(str(p)).read_buffer() if n else pa.py_buffer(b"")


def _plain(typ: pa.DataType, length: int, buf: pa.Buffer, children=None) -> pa.Array:
    return pa.Array.from_buffers(typ, length, [None, buf], null_count=0, children=children)


def _record_batch(header: dict, bufs: dict) -> pa.RecordBatch:
    """The index's one record batch over the given buffers (no copy)."""
    n = int(header["num_samples"])
    (odt, _, obuf), (_, _, blob) = bufs["path_offsets"], bufs["path_blob"]
    large = odt == np.int64
    for typ in ((pa.large_string(), pa.large_binary()) if large else (pa.string(), pa.binary())):
        path = pa.Array.from_buffers(typ, n, [None, obuf, blob], null_count=0)
        try:
            path.validate(full=True)  # string: every path UTF-8; otherwise binary (pandas gets bytes)
            break
        except pa.ArrowInvalid:
            continue
    else:
        raise RuntimeError("index paths: offsets do not fit the blob")
    ldt, _, lbuf = bufs["lines"]
    line = _plain(pa.int64() if ldt == np.int64 else pa.int32(), n, lbuf)
    pdt, _, pbuf = bufs["indptr"]
    cdt, nnz, cbuf = bufs["classes"]
    fdt, _, fbuf = bufs["confs"]
    if fdt == np.uint8:
        table = pa.array(np.asarray(header.get("conf_table") or [], np.float32))
        conf = pa.DictionaryArray.from_arrays(_plain(pa.uint8(), nnz, fbuf), table, safe=False)
    else:
        conf = _plain(pa.float32(), nnz, fbuf)
    item = pa.StructArray.from_arrays([_plain(pa.int32(), nnz, cbuf), conf], names=["class", "conf"])
    labels = pa.Array.from_buffers(labels_type(pdt == np.int64, conf.type), n, [None, pbuf], null_count=0,
                                   children=[item])
    verdict = pa.DictionaryArray.from_arrays(_plain(pa.uint8(), n, bufs["verdict"][2]),
                                             pa.array(VERDICTS, pa.string()), safe=False)
    cols = {"path": path, "line": line, "labels": labels, "verdict": verdict,
            "width": _plain(pa.uint16(), n, bufs["width"][2]), "height": _plain(pa.uint16(), n, bufs["height"][2])}
    if header.get("kind") == "shards":
        cols.update(shard=_plain(pa.int32(), n, bufs["shard"][2]),
                    shard_pos=_plain(pa.int32(), n, bufs["shard_pos"][2]))
    batch = pa.RecordBatch.from_arrays(list(cols.values()), names=list(cols))
    batch.validate()
    return batch


def write_index_file(path: str | os.PathLike, header: dict, arrays: dict, issues: Iterable = ()) -> Path:
    """Write the index (header: the JSON fields; arrays: by their names above, numpy or Streamed; issues: rows
    [code, file number, line, detail, path]) to a new file, seal it with its sha256, and rename it over `path`
    (fsync'ed): readers see the old file or the new one, never half of one, and a job that maps the old one
    keeps it."""
    path = Path(path)
    tmp_name = temp_name(path, "tmp")
    spill_dir: list[Path] = []

    def spill() -> Path:
        if not spill_dir:
            spill_dir.append(Path(tempfile.mkdtemp(prefix=temp_name(path, "build") + "-", dir=path.parent)))
        return spill_dir[0]
    try:
        bufs = {k: _arrow_buffer(k, v, spill) for k, v in arrays.items()}
        batch = _record_batch(header, bufs)
        head = {k: v for k, v in header.items() if k not in ("format", "conf_table", "arrays", "checksum")}
        meta = {KEY_FORMAT: FORMAT, KEY_HEADER: json.dumps(head, separators=(",", ":")),
                KEY_ISSUES: json.dumps([list(r) for r in issues], separators=(",", ":")), KEY_SHA256: SHA_BLANK}
        with atomic_file(path, tmp_name, mode=0o644) as f:
            with pa.ipc.new_file(f, batch.schema.with_metadata(meta)) as w:
                w.write_batch(batch)
            f.flush()
            with open(path.with_name(tmp_name), "r+b") as g:  # the digest, written in its place(s)
                size = os.fstat(g.fileno()).st_size
                spots = checksum_spots(g.fileno(), size, SHA_BLANK)
                if spots is None:
                    raise RuntimeError(f"{g.name}: the checksum's place is not found once in each schema copy")
                digest = checksum_digest(g, size, spots).encode()
                for spot in spots:
                    os.pwrite(g.fileno(), digest, spot)
    finally:
        for d in spill_dir:
            shutil.rmtree(d, ignore_errors=True)
    return path
