"""The data index a rank maps: which file the config points it to, and its identity (the checksum its writer
put in its trailer), the same on every rank of a run."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional


def index_path_of(cfg) -> tuple[Optional[Path], str]:
    """(the data index the run maps, '') or (None, why there is none to check)."""
    from hvpmtl.data.formats.index_file import default_index_path

    d = cfg.data
    if d.format == "tensors":
        return None, "data.format tensors: no data index"
    source = d.shards if d.format == "shards" else d.list_file
    if d.format == "shards" and str(source).startswith("s3://"):
        return None, "shards in a bucket: each node builds its own index copy"
    if d.index:
        return Path(d.index), ""
    if not source:
        from hvpmtl.data.formats.issues import DataError
        raise DataError(f"data.{'shards' if d.format == 'shards' else 'list_file'} is empty: no data set to check")
    return default_index_path(source), ""


def index_identity(path: Path) -> dict:
    """The cheapest identity of a data index: the sha256 the writer put in its trailer over every byte before it
    (40 bytes read; the header is checked by opening it), else, for an index written before the trailer, the
    sha256 of its JSON header (which holds the source's key and every array's layout). DataError when it is
    missing or damaged."""
    from hvpmtl.data.formats.index_file import TRAILER, TRAILER_MAGIC, DataIndex
    from hvpmtl.data.formats.issues import DataError

    idx = DataIndex(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if idx.has_checksum:
                f.seek(size - TRAILER)
                tail = f.read(TRAILER)
                if tail[:len(TRAILER_MAGIC)] != TRAILER_MAGIC:
                    raise DataError(f"{path}: damaged data index: no checksum trailer where its header says; "
                                    "rebuild it with `hvpmtl data index`")
                ident = "sha256:" + tail[len(TRAILER_MAGIC):].hex()
            else:
                n = int.from_bytes(f.read(16)[8:], "little")
                ident = "header-sha256:" + hashlib.sha256(f.read(n)).hexdigest()
        return {"path": str(path), "id": ident, "samples": idx.num_samples, "bytes": size}
    finally:
        idx.close()


def index_record(cfg) -> dict:
    """The record's `index`: its identity, a note when there is none to check, or the error (with the command
    that builds a missing index)."""
    from hvpmtl.data.formats.issues import DataError

    path = None
    try:
        path, note = index_path_of(cfg)
        return {"note": note} if path is None else index_identity(path)
    except DataError as e:
        if path is None:
            return {"error": str(e)}
        from hvpmtl.data.formats.index_fresh import index_command

        kind = "shards" if cfg.data.format == "shards" else "list"
        source = cfg.data.shards if kind == "shards" else cfg.data.list_file
        hint = (f"; build it once with `{index_command(kind, source, cfg.data.num_classes)}`"
                if "no data index" in str(e) and source else "")
        return {"path": str(path), "error": f"{e}{hint}"}
