"""Per-batch cost of reading a batch's labels and paths from the data index: `pread` per run of rows (what the
loader does, so an index changed in place is an error and never a SIGBUS) against fancy indexing into the
memory map (what it did before). Usage: python benchmarks/index_reads.py 100000 1000000"""
import sys
import time
from pathlib import Path

import numpy as np

from hvpmtl.data.formats.index_build import build_list_index
from hvpmtl.data.formats.list_file import write_list_file
from hvpmtl.data.loaders.labels import LabelTable
from hvpmtl.data.loaders.prepare import prepare_list


def measure(n: int) -> None:
    d = Path(f"/tmp/hvpmtl-index-reads-{n}")
    d.mkdir(exist_ok=True)
    p = d / "train.txt"
    if not p.exists():
        rng = np.random.default_rng(0)
        write_list_file(p, [(f"d/{i}.jpg", {int(k): 1.0 for k in rng.choice(11166, rng.integers(1, 12), replace=False)})
                            for i in range(n)])
        build_list_index(p, num_classes=11166, log=lambda m: None)
    s = prepare_list(str(p), str(d), num_classes=11166, skip_corrupt=False).samples
    idx, table = s.index, LabelTable(s, 11166)
    rng = np.random.default_rng(1)
    for batch in (16, 1024):
        ids = [rng.integers(0, n, batch) for _ in range(50)]
        t0 = time.perf_counter()
        for x in ids:
            table.sparse(x)
            [s.path(int(i)) for i in x]
        pread = (time.perf_counter() - t0) / 50
        t0 = time.perf_counter()
        for x in ids:
            start, end = idx.indptr[x].astype(np.int64), idx.indptr[x + 1].astype(np.int64)
            pos = np.concatenate([np.arange(a, b) for a, b in zip(start, end)])
            idx.classes[pos], idx.confs[pos]
            [bytes(idx.path_blob[int(idx.path_offsets[i]):int(idx.path_offsets[i + 1])]) for i in x]
        mapped = (time.perf_counter() - t0) / 50
        print(f"{n} lines, batch {batch}: pread {pread * 1e3:.2f} ms, mapping {mapped * 1e3:.2f} ms per batch")


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    for n in map(int, sys.argv[1:] or ["100000", "1000000"]):
        measure(n)
