"""The data index a rank maps: which file the config points it to, and its identity (the checksum its writer
put in its metadata), the same on every rank of a run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def index_path_of(cfg) -> tuple[Optional[Path], str]:
    """(the data index the run maps, '') or (None, why there is none to check)."""
    from hvpmtl.data.formats.index_format import default_index_path

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
    """The cheapest identity of a data index: the sha256 over the whole file that its writer stored in its
    metadata (read from the footer while opening it, which checks its structure; no array is read). DataError
    when it is missing or damaged."""
    from hvpmtl.data.formats.index_file import DataIndex

    idx = DataIndex(path)
    try:
        return {"path": str(path), "id": "sha256:" + idx.checksum, "samples": idx.num_samples,
                "bytes": os.path.getsize(path)}
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
