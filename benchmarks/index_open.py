"""What opening the data index costs a rank, and what checking it costs offline, at growing sizes: the build
(wall, CPU, file size), then in a fresh process (everything imported first) `DataIndex(...)` (wall, Arrow
memory allocated, USS/RSS added, bytes read through read()/pread), `prepare_list` (start-up's data step), one
batch of 256 label rows and paths through the per-batch checks, `verify()` (whole-file sha256 + invariants) and
a plain sha256 of the file. The lists are benchmarks/data_scale.py's (ImageNet-style paths, 1-20 labels of
11,166 classes). Usage: python benchmarks/index_open.py 1000000 2000000 [--workdir DIR]"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from data_scale import io_counters, run_child, smaps, write_list  # noqa: E402  (also puts the repository first)


def child_open(list_file: str) -> dict:
    import numpy as np
    import pyarrow as pa

    from hvpmtl.data.formats.index_file import DataIndex

    from hvpmtl.data.formats.index_format import default_index_path
    from hvpmtl.data.loaders.prepare import IndexOptions, prepare_list
    from hvpmtl.fileio import sha256_file
    path = default_index_path(list_file)
    m0, io0, a0 = smaps(), io_counters(), pa.total_allocated_bytes()
    t = time.perf_counter()
    idx = DataIndex(path)
    first_s = time.perf_counter() - t
    a1, io1, m1 = pa.total_allocated_bytes(), io_counters(), smaps()
    opens = []
    for _ in range(20):
        t = time.perf_counter()
        DataIndex(path).close()
        opens.append(time.perf_counter() - t)
    t = time.perf_counter()
    prep = prepare_list(list_file, str(Path(list_file).parent), num_classes=11166, skip_corrupt=False,
                        index=IndexOptions(auto_build_max=0, log=lambda m: None))
    prepare_s = time.perf_counter() - t
    s = prep.samples
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(50):
        ids = rng.integers(0, len(s), 256)
        t = time.perf_counter()
        start, count = s.label_rows(ids)
        s.label_values(np.concatenate([np.arange(a, a + c) for a, c in zip(start, count)]))
        s.path(int(ids[0]))
        batches.append(time.perf_counter() - t)
    t, c = time.perf_counter(), time.process_time()
    problems = idx.verify()
    verify_s, verify_cpu = time.perf_counter() - t, time.process_time() - c
    assert not problems, problems
    t = time.perf_counter()
    sha256_file(path)
    sha_s = time.perf_counter() - t
    return {"first_open_s": first_s, "open_s_median": float(np.median(opens)), "open_s_min": min(opens),
            "arrow_alloc": a1 - a0, "uss_open": m1["uss"] - m0["uss"], "rss_open": m1["rss"] - m0["rss"],
            "rchar_open": io1["rchar"] - io0["rchar"], "prepare_s": prepare_s,
            "batch256_s_median": float(np.median(batches)), "verify_s": verify_s, "verify_cpu": verify_cpu,
            "sha256_s": sha_s, "index_bytes": path.stat().st_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", type=int, nargs="*", default=[1_000_000, 2_000_000])
    ap.add_argument("--workdir", default="/tmp/hvpmtl-index-open")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.sizes:
            lst = work / f"train_{n}.txt"
            if not lst.exists():
                write_list(lst, n)
            build = run_child("build", lst, f"{lst}.hvpidx")
            p = subprocess.run([sys.executable, str(HERE), "_open", str(lst)], capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(p.stdout + p.stderr)
            r = json.loads(p.stdout.strip().splitlines()[-1]) | {"n": n, "build": build}
            rows.append(r)
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| lines | index MiB | build s (CPU s) | open ms, first / median of 20 | Arrow bytes allocated at open | "
          "USS / RSS KiB added at open | bytes read at open | prepare_list ms | batch of 256 ms | verify s (CPU s) | "
          "sha256 s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["build"]
        print(f"| {r['n']:,} | {r['index_bytes'] / 2**20:.1f} | {b['wall_s']:.1f} ({b['cpu_s']:.1f}) | "
              f"{r['first_open_s'] * 1e3:.2f} / {r['open_s_median'] * 1e3:.2f} | {r['arrow_alloc']:,} | "
              f"{r['uss_open'] / 1024:.0f} / {r['rss_open'] / 1024:.0f} | {r['rchar_open']:,} | "
              f"{r['prepare_s'] * 1e3:.2f} | {r['batch256_s_median'] * 1e3:.2f} | {r['verify_s']:.2f} "
              f"({r['verify_cpu']:.2f}) | {r['sha256_s']:.2f} |")
    return 0


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers were measured with
    if len(sys.argv) > 2 and sys.argv[1] == "_open":
        print(json.dumps(child_open(sys.argv[2])))
        sys.exit(0)
    print(provenance_line(), flush=True)
    sys.exit(main())
