"""Data start-up at scale: how time and memory grow with the data set, per rank and per node of 8 ranks.

For list files of growing size (realistic ImageNet-style paths, 1-20 labels each) this measures
  * `hvpmtl data index` (once per data set): wall and CPU seconds, lines/s, peak anonymous memory
    (sampled from /proc/self/smaps_rollup) against the size of the index it writes;
  * start-up of the loader on 1 rank and on 8 ranks at once (8 processes mapping the same index):
    seconds to build the loader and to draw the first epoch's order, private memory (USS) and
    proportional memory (PSS) before and after, peak USS while building, bytes read through
    read() at start-up (/proc/self/io rchar) and image files opened (the image root is an empty,
    mode-000 folder: any open would fail, and an audit hook counts Python-level opens under it);
  * the same for a shard folder's index of the same size (tars as sparse files: start-up only
    stats them);
and extrapolates linearly to --target samples (17.6M: Tencent ML-Images). With --jpegs N it also
times `validate` (header and full decode) and `to-shards` on N real JPEGs with 1 and 2 processes.

    nice -n 19 python benchmarks/data_scale.py --sizes 1000000 5000000 --jpegs 2000
Everything is written under --workdir (default /tmp/hvpmtl-data-scale) and deleted afterwards
unless --keep. Prints a markdown table (and --json FILE writes the numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

# the repository on the path; nothing heavy at import: the validate/to-shards worker processes (spawned)
# import this file again
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- memory and I/O probes


def smaps() -> dict:
    """USS (private), PSS and anonymous memory of this process, in bytes."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0]) * 1024
    return {"uss": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0), "pss": out.get("Pss", 0),
            "anon": out.get("Anonymous", 0), "rss": out.get("Rss", 0)}


def io_counters() -> dict:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


class PeakSampler:
    """Samples smaps_rollup every few ms in a thread; `peak[key]` is the largest value seen."""

    def __init__(self, every: float = 0.01):
        self.every, self.peak, self._stop = every, smaps(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(self.every):
            for k, v in smaps().items():
                self.peak[k] = max(self.peak[k], v)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        for k, v in smaps().items():
            self.peak[k] = max(self.peak[k], v)
        return self.peak


# ----------------------------------------------------------------------------- data generation


def write_list(path: Path, n: int, seed: int = 0) -> None:
    """n lines `train/nXXXXXXXX/nXXXXXXXX_<i>.JPEG<TAB>idx:conf...` with 1-20 labels from 11,166 classes."""
    rng = np.random.default_rng(seed)
    confs = np.array(["1", "0.9", "0.8"])
    with open(path, "w") as f:
        for s in range(0, n, 200_000):
            m = min(200_000, n - s)
            k = rng.integers(1, 21, m)
            total = int(k.sum())
            row = np.repeat(np.arange(m), k)
            # distinct classes per line (gaps of 1..550 from a random start: at most 20 x 550 < 11,166), in random order
            step = rng.integers(1, 551, total)
            first = np.concatenate([[0], np.cumsum(k)[:-1]])
            step[first] = rng.integers(0, 11166, m)
            cum = np.cumsum(step)
            cls = (cum - np.repeat(cum[first] - step[first], k)) % 11166
            cls = cls[np.lexsort((rng.random(total), row))]
            toks = np.char.add(np.char.add(cls.astype(str), ":"), confs[rng.integers(0, 3, total)])
            ends = np.cumsum(k)
            wn = [f"n{(j * 7919) % 99999999:08d}" for j in range(s, s + m)]
            lines = [f"train/{w}/{w}_{s + i}.JPEG\t" + "\t".join(toks[ends[i] - k[i]:ends[i]]) for i, w in enumerate(wn)]
            f.write("\n".join(lines) + "\n")


def fake_shards(folder: Path, list_index: Path, shard_size: int = 1000) -> None:
    """A shard folder whose label record and DALI indices are real and whose tars are sparse files of
    the right size: enough to index it and to start a loader on it (start-up stats the tars only)."""
    from hvpmtl.data.formats.index_file import DataIndex
    from hvpmtl.data.formats.shards import FORMAT, LABELS, MANIFEST
    idx = DataIndex(list_index)
    n = len(idx)
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng([0, 7]).permutation(n)
    shards = []
    member = 50_000  # bytes per fake image
    for s, start in enumerate(range(0, n, shard_size)):
        ids = order[start:start + shard_size]
        name = f"shard-{s:06d}"
        lines, off = [f"v1.2 {len(ids)}"], 0
        for i in ids.tolist():
            key = f"{i:09d}"
            lines.append(f"jpg {off + 512} {member} {key}.jpg id {off + 1024 + member} 8 {key}.id")
            off += 2048 + member
        (folder / f"{name}.idx").write_text("\n".join(lines) + "\n")
        with open(folder / f"{name}.tar", "wb") as f:
            f.truncate(off + 1024)
        shards.append({"name": f"{name}.tar", "samples": len(ids)})
    np.savez(folder / LABELS, order=order, indptr=np.asarray(idx.indptr, np.int64),
             classes=np.asarray(idx.classes, np.int32), confs=idx.conf_values(np.arange(idx.header["nnz"])),
             lines=np.asarray(idx.lines, np.int64), path_blob=np.asarray(idx.path_blob),
             path_offsets=np.asarray(idx.path_offsets, np.int64))
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "num_samples": n, "num_classes": 11166,
                                               "shard_size": shard_size, "shards": shards, "seed": 0}))


def write_jpegs(root: Path, n: int) -> Path:
    """n real JPEGs of ~70 KB (500x375, textured) and their list file."""
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (375 // 5 + 1, 500 // 5 + 1, 3), dtype=np.uint8)
    lines = []
    for i in range(n):
        a = np.kron(np.roll(base, i, axis=1), np.ones((5, 5, 1), np.uint8))[:375, :500]
        a = np.clip(a.astype(np.int16) + rng.integers(-4, 5, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / f"img/{i:06d}.jpg", quality=70)
        lines.append(f"img/{i:06d}.jpg\t{i % 100}:1\t{(i * 7) % 100}:0.9")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root / "train.txt"


# ----------------------------------------------------------------------------- child processes


def child_build(list_file: str, out: str) -> dict:
    from hvpmtl.data.formats.index_build import build_list_index
    sampler = PeakSampler()
    base = smaps()
    t, c = time.perf_counter(), time.process_time()
    path = build_list_index(list_file, out, num_classes=11166)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak = sampler.stop()
    return {"wall_s": wall, "cpu_s": cpu, "peak_anon": peak["anon"] - base["anon"], "peak_anon_abs": peak["anon"],
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "index_bytes": Path(path).stat().st_size}


def child_rank(cfg_json: str, go_file: str, rank: int, world: int) -> dict:
    """One rank's start-up: import everything first (not counted), then build the loader."""
    import hashlib  # noqa: F401  what a first call would import lazily: rchar then counts data bytes only
    import tempfile  # noqa: F401

    import pyarrow.compute  # noqa: F401
    import torch  # noqa: F401

    import hvpmtl.data.formats.index_fresh  # noqa: F401
    import hvpmtl.data.loaders.prepare  # noqa: F401
    from hvpmtl.config import DataConfig
    from hvpmtl.data.loaders.order import epoch_batches
    from hvpmtl.data.loaders.pretrain import build_pretrain_loader
    cfg = DataConfig(**json.loads(cfg_json))
    root = os.path.realpath(cfg.root) if cfg.root else None
    opens = []

    def audit(event, args):
        if event == "open" and root and args and isinstance(args[0], (str, bytes)) and \
                os.fsdecode(args[0]).startswith(root):
            opens.append(args[0])
    sys.addaudithook(audit)
    while not os.path.exists(go_file):  # all ranks start together
        time.sleep(0.005)
    before, io0 = smaps(), io_counters()
    sampler = PeakSampler()
    t, c = time.perf_counter(), time.process_time()
    loader = build_pretrain_loader(cfg, batch_size=16, patch_size=16, rank=rank, world_size=world, local_rank=rank % 8,
                                   seed=0, log=lambda m: None)
    build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    batches = epoch_batches(loader.num_samples, 16, world, rank, 0, 0)
    order_s, order_cpu = time.perf_counter() - t, time.process_time() - c
    peak = sampler.stop()
    after, io1 = smaps(), io_counters()
    del batches
    held = smaps()
    return {"rank": rank, "build_s": build_s, "order_s": order_s, "build_cpu": build_cpu, "order_cpu": order_cpu,
            "samples": loader.num_samples,
            "uss_before": before["uss"], "uss_after": held["uss"], "uss_peak": peak["uss"],
            "pss_before": before["pss"], "pss_after": held["pss"], "uss_with_order": after["uss"],
            "rchar": io1["rchar"] - io0["rchar"], "read_bytes": io1["read_bytes"] - io0["read_bytes"],
            "syscr": io1["syscr"] - io0["syscr"], "image_opens": len(opens)}


def run_child(kind: str, *args) -> dict:
    p = subprocess.run([sys.executable, str(HERE), f"_{kind}", *map(str, args)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"child {kind} failed:\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def start_ranks(cfg: dict, ranks: int, work: Path) -> list[dict]:
    go = work / f"go-{time.time_ns()}"
    procs = [subprocess.Popen([sys.executable, str(HERE), "_rank", json.dumps(cfg), str(go), str(r), str(ranks)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    time.sleep(8 + 2 * ranks)  # let every rank finish its imports (torch, DALI) before the start signal
    go.write_text("go")
    out = []
    for p in procs:
        so, se = p.communicate()
        if p.returncode:
            raise SystemExit(f"rank failed:\n{so}\n{se}")
        out.append(json.loads(so.strip().splitlines()[-1]))
    go.unlink()
    return out


# ----------------------------------------------------------------------------- offline tools


def bench_tools(work: Path, n: int, repeat: int, results: dict) -> None:
    from hvpmtl.data.tools.to_shards import write_shards
    from hvpmtl.data.tools.validate import validate_list
    root = work / "jpegs"
    t = time.perf_counter()
    lst = write_jpegs(root, n)
    size = sum(p.stat().st_size for p in (root / "img").iterdir())
    print(f"  {n} JPEGs, {size / n / 1024:.0f} KB each, written in {time.perf_counter() - t:.0f} s", flush=True)
    # header checks are cheap: `repeat` hard links of every file make a list long enough to time them
    lines = lst.read_text().splitlines()
    many = [lines]
    for r in range(1, repeat):
        (root / f"link{r}").mkdir(exist_ok=True)
        for p in (root / "img").iterdir():
            os.link(p, root / f"link{r}" / p.name)
        many.append([line.replace("img/", f"link{r}/", 1) for line in lines])
    big = root / "many.txt"
    big.write_text("\n".join(x for m in many for x in m) + "\n")
    for p in (root / "img").iterdir():  # warm the page cache: every run reads from memory
        p.read_bytes()
    rows = []
    for what in ("validate (header)", "validate (full decode)", "to-shards"):
        for workers in (1, 2):
            for extra in root.glob("*.txt.hvpidx*"):
                shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
            shutil.rmtree(work / "shards", ignore_errors=True)
            import hvpmtl.data.formats.index_build as index_mod
            lst = big if what == "validate (header)" else root / "train.txt"
            n_checked = n * repeat if what == "validate (header)" else n
            index_mod.build_list_index(lst, num_classes=100)  # built once per data set: not in the timing
            import hvpmtl.data.tools.to_shards as shards_mod
            import hvpmtl.data.tools.validate as validate_mod
            validate_mod.SMALL = shards_mod.SMALL = 0
            t, c0, ch0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
            if what.startswith("validate"):
                rep = validate_list(str(lst), str(root), num_classes=100, full_decode="full" in what, workers=workers)
                assert not rep.errors, rep.errors[:3]
            else:
                write_shards(str(lst), str(root), str(work / "shards"), 250, num_classes=100, workers=workers)
            dt = time.perf_counter() - t
            ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker processes, once they have exited
            cpu = time.process_time() - c0 + (ch1.ru_utime - ch0.ru_utime) + (ch1.ru_stime - ch0.ru_stime)
            rows.append({"tool": what, "processes": workers, "images": n_checked, "img_per_s": n_checked / dt,
                         "seconds": dt, "cpu_s": cpu, "img_per_cpu_s": n_checked / cpu})
            print(f"  {what}, {workers} process(es): {n_checked / dt:,.0f} img/s, {n_checked / cpu:,.0f} img per "
                  "CPU-second", flush=True)
    results["tools"] = {"images": n, "repeat": repeat, "kb_per_image": size / n / 1024, "rows": rows}


# ----------------------------------------------------------------------------- report


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def extrapolate(xs, ys, x):
    a, b = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return a * x + b


def table(results: dict, target: int) -> str:
    sizes = results["sizes"]
    ns = [s["n"] for s in sizes]
    out = [f"machine: {results['machine']}; {results['date']}; `{results['command']}`", ""]
    out += ["| lines | index build s (lines/s) | CPU s | peak anon MiB / index MiB | "
            "start-up s, 1 rank / max of 8 (CPU s, 1 rank) | epoch order s (CPU s) | USS MiB for the data, 1 rank / mean of 8 | "
            "bytes read at start-up | image opens |", "|" + "---|" * 9]

    def row(label, b, r1, r8):
        return (f"| {label} | {b['wall_s']:.1f} ({b['n'] / b['wall_s']:,.0f}) | {b['cpu_s']:.1f} | "
                f"{mib(b['peak_anon'])} / {mib(b['index_bytes'])} | {r1[0]['build_s']:.2f} / "
                f"{max(r['build_s'] for r in r8):.2f} ({r1[0]['build_cpu']:.2f}) | {r1[0]['order_s']:.2f} "
                f"({r1[0]['order_cpu']:.2f}) | "
                f"{mib(r1[0]['uss_after'] - r1[0]['uss_before'])} / "
                f"{mib(np.mean([r['uss_after'] - r['uss_before'] for r in r8]))} | "
                f"{max(r['rchar'] for r in r1 + r8):,} | {sum(r['image_opens'] for r in r1 + r8)} |")
    for s in sizes:
        out.append(row(f"{s['n']:,} (list)", s["build"] | {"n": s["n"]}, s["list_1"], s["list_8"]))
    if len(sizes) >= 2:
        def ex(f):
            return extrapolate(ns, [f(s) for s in sizes], target)
        out.append(f"| **{target:,}** (extrapolated) | {ex(lambda s: s['build']['wall_s']):.0f} | "
                   f"{ex(lambda s: s['build']['cpu_s']):.0f} | {mib(ex(lambda s: s['build']['peak_anon']))} / "
                   f"{mib(ex(lambda s: s['build']['index_bytes']))} | "
                   f"{ex(lambda s: s['list_1'][0]['build_s']):.2f} / "
                   f"{ex(lambda s: max(r['build_s'] for r in s['list_8'])):.2f} "
                   f"({ex(lambda s: s['list_1'][0]['build_cpu']):.2f}) | "
                   f"{ex(lambda s: s['list_1'][0]['order_s']):.2f} ({ex(lambda s: s['list_1'][0]['order_cpu']):.2f}) | "
                   f"{mib(ex(lambda s: s['list_1'][0]['uss_after'] - s['list_1'][0]['uss_before']))} / "
                   f"{mib(ex(lambda s: np.mean([r['uss_after'] - r['uss_before'] for r in s['list_8']])))} | | 0 |")
    if sizes and "shards_1" in sizes[0]:
        out += ["", "| shards (same samples, 1000 per tar) | start-up s, 1 rank / max of 8 (CPU s, 1 rank) | "
                    "USS MiB for the data, 1 rank / mean of 8 | peak USS MiB (1 rank) | bytes read |",
                "|---|---|---|---|---|"]
        for s in sizes:
            r1, r8 = s["shards_1"], s["shards_8"]
            out.append(f"| {s['n']:,} | {r1[0]['build_s']:.2f} / {max(r['build_s'] for r in r8):.2f} "
                       f"({r1[0]['build_cpu']:.2f}) | "
                       f"{mib(r1[0]['uss_after'] - r1[0]['uss_before'])} / "
                       f"{mib(np.mean([r['uss_after'] - r['uss_before'] for r in r8]))} | "
                       f"{mib(r1[0]['uss_peak'] - r1[0]['uss_before'])} | "
                       f"{max(r['rchar'] for r in r1 + r8):,} |")
    if "tools" in results:
        t = results["tools"]
        out += ["", f"| offline tool ({t['images']} JPEGs of {t['kb_per_image']:.0f} KB, page cache warm; header checks "
                    f"on {t['images'] * t['repeat']} hard links) | "
                    "1 process: img/s (img per CPU-s; cores used) | 2 processes: img/s (img per CPU-s; cores used) |",
                "|---|---|---|"]
        by = {}
        for r in t["rows"]:
            by.setdefault(r["tool"], {})[r["processes"]] = r
        for tool, v in by.items():
            out.append(f"| {tool} | " + " | ".join(
                f"{v[k]['img_per_s']:,.0f} ({v[k]['img_per_cpu_s']:,.0f}; {v[k]['img_per_s'] / v[k]['img_per_cpu_s']:.2f})"
                for k in (1, 2)) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 5_000_000], help="list lengths to measure")
    ap.add_argument("--ranks", type=int, default=8, help="processes started at once (a node)")
    ap.add_argument("--target", type=int, default=17_600_000, help="extrapolate to this many samples")
    ap.add_argument("--jpegs", type=int, default=0, help="real JPEGs for the validate/to-shards timings (0: skip)")
    ap.add_argument("--repeat", type=int, default=5, help="hard links per JPEG for the header-check timing")
    ap.add_argument("--no-shards", action="store_true", help="skip the shard-folder start-up")
    ap.add_argument("--workdir", default="/tmp/hvpmtl-data-scale", help="scratch folder (deleted unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    empty = work / "no-images"
    empty.mkdir(exist_ok=True)
    os.chmod(empty, 0)  # an image root nothing can be read from
    results = {"machine": f"{socket.gethostname()}: {os.cpu_count()} CPUs, "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
                          f"load {os.getloadavg()[0]:.1f} at start",
               "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python benchmarks/data_scale.py " + " ".join(
                   argv if argv is not None else sys.argv[1:]), "sizes": []}
    try:
        for n in args.sizes:
            print(f"== {n:,} lines", flush=True)
            lst = work / f"train_{n}.txt"
            t = time.perf_counter()
            write_list(lst, n)
            print(f"  list file: {lst.stat().st_size / 2**20:,.0f} MiB, written in {time.perf_counter() - t:.0f} s",
                  flush=True)
            build = run_child("build", lst, f"{lst}.hvpidx")
            print(f"  index: {build['wall_s']:.1f} s, {n / build['wall_s']:,.0f} lines/s, peak anon "
                  f"{mib(build['peak_anon'])} MiB, index {mib(build['index_bytes'])} MiB", flush=True)
            cfg = {"format": "tencent", "root": str(empty), "list_file": str(lst), "num_classes": 11166,
                   "num_threads": 1, "device": "cpu", "index_auto_build": 0}
            s = {"n": n, "build": build, "list_1": start_ranks(cfg, 1, work), "list_8": start_ranks(cfg, args.ranks, work)}
            print(f"  list start-up: {s['list_1'][0]['build_s']:.2f} s (1 rank), "
                  f"{max(r['build_s'] for r in s['list_8']):.2f} s (max of {args.ranks}); USS +"
                  f"{mib(s['list_1'][0]['uss_after'] - s['list_1'][0]['uss_before'])} MiB", flush=True)
            if not args.no_shards:
                folder = work / f"shards_{n}"
                t = time.perf_counter()
                fake_shards(folder, Path(f"{lst}.hvpidx"))
                from hvpmtl.data.formats.index_build import build_shard_index
                build_shard_index(folder)
                print(f"  shard folder + index: {time.perf_counter() - t:.0f} s", flush=True)
                scfg = {"format": "shards", "shards": str(folder), "num_classes": 11166, "num_threads": 1,
                        "device": "cpu", "index_auto_build": 0}
                s["shards_1"] = start_ranks(scfg, 1, work)
                s["shards_8"] = start_ranks(scfg, args.ranks, work)
                print(f"  shard start-up: {s['shards_1'][0]['build_s']:.2f} s (1 rank), "
                      f"{max(r['build_s'] for r in s['shards_8']):.2f} s (max of {args.ranks})", flush=True)
                shutil.rmtree(folder)
                Path(f"{folder}.hvpidx").unlink()
            results["sizes"].append(s)
            lst.unlink()
            Path(f"{lst}.hvpidx").unlink()
        if args.jpegs:
            print(f"== offline tools on {args.jpegs} JPEGs", flush=True)
            bench_tools(work, args.jpegs, args.repeat, results)
    finally:
        os.chmod(empty, 0o755)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = table(results, args.target)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        kind, rest = sys.argv[1][1:], sys.argv[2:]
        if kind == "build":
            r = child_build(*rest)
        elif kind == "rank":
            r = child_rank(rest[0], rest[1], int(rest[2]), int(rest[3]))
        else:
            raise SystemExit(f"unknown child {kind}")
        print(json.dumps(r))
        sys.exit(0)
    sys.exit(main())
