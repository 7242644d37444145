"""`hvpmtl doctor`: a pre-flight on every rank of a hostfile or Slurm allocation, started by the same launchers
as training (`deepspeed --hostfile hosts launchers/doctor.py --config C`, `srun`, launchers/slurm/doctor.sbatch),
so a mismatched node fails in seconds instead of as a collective timeout an hour into the queue.

Every rank builds one record (host, hvpmtl revision and a hash of its sources, torch/DeepSpeed/DALI/CUDA
versions, GPU, the data index's identity, what it saw of the shared `run.output_dir`, its clock against the other
ranks and against that file system's mtimes, one timed all-reduce of the gradient size, free memory against the
config's need); rank 0 gathers them (all_gather_object), compares, prints one table and the problems, each
naming host and rank. Exit codes: 0 every check passed, 2 config error, 5 a rank did not answer (collective
failed or timed out), 7 some check failed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hvpmtl.fileio import fsync_file

EXIT_OK, EXIT_CONFIG, EXIT_PEER_LOST, EXIT_CHECK_FAILED = 0, 2, 5, 7
REVISION_ENV = "HVPMTL_REVISION"  # overrides the detected revision (an install without git metadata; the tests)
PROBE_PREFIX = ".hvpmtl-doctor-"
PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT = PACKAGE_DIR.parent
ENTRY = CHECKOUT / "launchers" / "doctor.py"
# what must be the same on every rank (record key -> what the table and messages call it)
SAME_EVERYWHERE = {"revision": "hvpmtl revision", "sources": "hvpmtl sources (sha256 of hvpmtl/**/*.py)",
                   "python": "Python", "torch": "torch", "deepspeed": "DeepSpeed", "dali": "DALI",
                   "cuda": "CUDA (torch build)", "gpu": "GPU model"}
GIB = 2**30


@dataclass
class Limits:
    max_clock_skew_s: float = 5.0  # the run lock compares mtimes across hosts: a few seconds are harmless
    min_busbw_gbs: float = 0.0  # 0: the all-reduce bandwidth is reported, never judged
    need_gb: Optional[float] = None  # None: the config's model states (a lower bound: activations come on top)


@dataclass
class Problem:
    check: str
    rank: int
    host: str
    message: str

    def __str__(self) -> str:
        return f"{self.host} (rank {self.rank}): {self.check}: {self.message}"


# ----------------------------------------------------------------------------- what one rank knows

def revision(root: Path = CHECKOUT) -> str:
    """`git describe` of the checkout hvpmtl is imported from, else the package version (REVISION_ENV wins)."""
    if os.environ.get(REVISION_ENV):
        return os.environ[REVISION_ENV]
    from hvpmtl import __version__

    if (root / ".git").exists():
        try:  # safe.directory: the checkout may belong to another user than the one the ranks run as
            cp = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(root), "describe", "--always",
                                 "--dirty", "--tags"], capture_output=True, text=True, timeout=20)
            if cp.returncode == 0 and cp.stdout.strip():
                return cp.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return f"{__version__} (no git)"


def sources_hash(package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 of every hvpmtl/**/*.py (relative path and bytes): two checkouts that `git describe` calls the same
    (both -dirty, or no git at all) still differ here when their code does."""
    h = hashlib.sha256()
    for p in sorted(package_dir.rglob("*.py")):
        h.update(str(p.relative_to(package_dir)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def versions(local_rank: int) -> dict:
    import deepspeed
    import torch

    try:
        import nvidia.dali as dali
        dali_version = dali.__version__
    except ImportError:
        dali_version = "not installed"
    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "dali": dali_version, "cuda": torch.version.cuda or "none",
            "gpu": torch.cuda.get_device_name(local_rank) if cuda else "no GPU"}


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


def gradient_numel(cfg) -> tuple[int, int]:
    """(trainable parameters of the student = the gradient a step reduces, parameters of the EMA teacher), counted
    on the meta device: no weights are made."""
    import torch

    from hvpmtl.models.meta_arch import Student

    with torch.device("meta"):
        student = Student(cfg)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    teacher = 0
    if student.weights["distill"] > 0:
        teacher = sum(p.numel() for m in (student.backbone, student.label_decoder) for p in m.parameters())
    return trainable, teacher


def zero_stage(cfg) -> int:
    from hvpmtl.train.runtime import build_ds_config

    try:
        return int(build_ds_config(cfg, 1, "fp32").get("zero_optimization", {}).get("stage", 0))
    except Exception:  # noqa: BLE001 — the engine reports a bad ds_config itself; assume the designed ZeRO-2
        return 2


def model_state_bytes(params: int, teacher: int, world: int, precision: str, stage: int) -> int:
    """Bytes per rank of the model states: weights (2 bytes bf16/fp16, 4 fp32), gradients (partitioned from ZeRO
    stage 2), AdamW's fp32 state (master copy under bf16/fp16, m and v; partitioned from stage 1), the fp32
    teacher. Activations come on top (docs/BENCHMARKS.md measures them per config)."""
    w = 4 if precision == "fp32" else 2
    adam = 8 if precision == "fp32" else 12
    grads = w * params / (world if stage >= 2 else 1)
    optim = adam * params / (world if stage >= 1 else 1)
    return int(w * params + grads + optim + 4 * teacher)


def memory(local_rank: int) -> dict:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(local_rank)
        return {"kind": "gpu", "free_gb": free / GIB, "total_gb": total / GIB}
    avail = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return {"kind": "cpu", "free_gb": avail, "total_gb": None}


# ----------------------------------------------------------------------------- the shared output directory

def probe_name(nonce: str, rank: int) -> str:
    return f"{PROBE_PREFIX}{nonce}-rank{rank}"


def write_probe(directory: Path, nonce: str, rank: int) -> tuple[Optional[float], str]:
    """Write this rank's probe file (fsync'ed); (its mtime minus this rank's clock at the write, '') or
    (None, why it could not be written). The mtime comes from the file system (the server's clock on NFS), the
    clock the run lock's heartbeats are judged by."""
    path = directory / probe_name(nonce, rank)
    try:
        before = time.time()
        with open(path, "w") as f:
            f.write(nonce)
            fsync_file(f)
        after = time.time()
        return os.stat(path).st_mtime - (before + after) / 2, ""
    except OSError as e:
        return None, f"cannot write {path}: {e.strerror or e}"


def read_probe(directory: Path, nonce: str, rank: int) -> str:
    """'' when rank `rank`'s probe is there with the right content, else what is wrong."""
    path = directory / probe_name(nonce, rank)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return f"{path} (written by rank {rank}) is not there"
    except OSError as e:
        return f"cannot read {path} (written by rank {rank}): {e.strerror or e}"
    return "" if text == nonce else f"{path} (written by rank {rank}) holds {text[:40]!r}, not what was written"


# ----------------------------------------------------------------------------- comparing the records

def _majority(records: list[dict], get) -> object:
    """The value most ranks have; a tie goes to rank 0's (the launching node)."""
    counts = Counter(json.dumps(get(r), sort_keys=True) for r in records)
    top = max(counts.values())
    ref = json.dumps(get(records[0]), sort_keys=True)
    return json.loads(ref) if counts[ref] == top else json.loads(counts.most_common(1)[0][0])


def _where(records: list[dict], value, get) -> str:
    who = [r for r in records if get(r) == value]
    hosts = sorted({r["host"] for r in who})
    return f"{len(who)} rank(s) on {', '.join(hosts[:4])}{' ...' if len(hosts) > 4 else ''}"


def compare(records: list[dict], limits: Limits = Limits()) -> list[Problem]:
    """Every problem the records show, each naming the rank and host it is on."""
    problems: list[Problem] = []

    def add(check: str, r: dict, message: str) -> None:
        problems.append(Problem(check, r["rank"], r["host"], message))

    for key, name in SAME_EVERYWHERE.items():
        get = lambda r, k=key: r.get(k)  # noqa: E731
        want = _majority(records, get)
        for r in records:
            if get(r) != want:
                add(name, r, f"{get(r)}, but {want} on {_where(records, want, get)}")

    with_index = [r for r in records if r["index"].get("id")]
    for r in records:
        if r["index"].get("error"):
            add("data index", r, r["index"]["error"])
    if with_index:
        get = lambda r: r["index"]["id"]  # noqa: E731
        want = _majority(with_index, get)
        for r in with_index:
            if get(r) != want:
                add("data index", r, f"{r['index']['path']} is {get(r)[:23]}... ({r['index']['samples']} samples), "
                                     f"not the {want[:23]}... of {_where(with_index, want, get)}")

    writers_seen = set(range(len(records))) - set(records[0]["output_dir"].get("unseen", []))
    for r in records:
        o = r["output_dir"]
        for err in o.get("errors", []):
            add("run.output_dir", r, err)
        if r["rank"] not in writers_seen and not o.get("errors"):  # else already named, for its cause
            add("run.output_dir", r, f"rank 0 does not see the file this rank wrote into {o['path']}: "
                                     "run.output_dir is not one shared directory")
        off = o.get("mtime_offset_s")
        if off is not None and abs(off) > limits.max_clock_skew_s:
            add("clock", r, f"{off:+.1f} s against the mtimes of the file system of {o['path']} (limit "
                            f"{limits.max_clock_skew_s:g} s; the run lock judges heartbeats by them): sync the clock (NTP)")

    t0 = records[0]["clock"]
    for r in records:
        skew = r["clock"] - t0
        if abs(skew) > limits.max_clock_skew_s:
            add("clock", r, f"{skew:+.1f} s against rank 0's clock (limit {limits.max_clock_skew_s:g} s): "
                            "sync the clocks (NTP)")

    for r in records:
        a = r["allreduce"]
        if a.get("error"):
            add("all-reduce", r, a["error"])
        elif limits.min_busbw_gbs > 0 and len(records) > 1 and a["busbw_gbs"] < limits.min_busbw_gbs:
            add("all-reduce", r, f"bus bandwidth {a['busbw_gbs']:.2f} GB/s, below the {limits.min_busbw_gbs:g} "
                                 "GB/s asked for (check NCCL_SOCKET_IFNAME / NCCL_IB_HCA, NCCL_DEBUG=INFO)")

    for r in records:
        m = r["memory"]
        if m["kind"] == "gpu" and m["free_gb"] < r["need_gb"]:
            add("GPU memory", r, f"{m['free_gb']:.1f} GiB free of {m['total_gb']:.1f}, the config needs "
                                 f"{r['need_gb']:.1f} GiB: another process holds the GPU, or lower "
                                 "optim.micro_batch_size")
    return problems


# ----------------------------------------------------------------------------- the report

def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def report(records: list[dict], problems: list[Problem], limits: Limits = Limits()) -> str:
    """The table rank 0 prints: one row per rank, then the all-reduce, then the problems or the all-clear."""
    bad = {(p.rank, p.check) for p in problems}
    t0 = records[0]["clock"]
    same = list(SAME_EVERYWHERE)
    headers = ["rank", "host", *same, "data index", "output_dir", "clock s", "all-reduce ms",
               "memory free / need GiB"]
    rows = []
    for r in records:
        idx = r["index"]
        ident = idx.get("id", "")
        index_cell = ident.split(":")[1][:12] if ident else ("FAIL" if idx.get("error") else "-")
        if (r["rank"], "data index") in bad and ident:
            index_cell += " FAIL"
        m, a = r["memory"], r["allreduce"]
        mem = (f"{m['free_gb']:.1f} / {r['need_gb']:.1f}" if m["kind"] == "gpu"
               else f"no GPU, RAM {m['free_gb']:.1f} free")
        # a value that differs from most ranks' is marked with *
        versions_cells = [f"{str(r[k])[:8] if k == 'sources' else r[k]}"
                          f"{' *' if (r['rank'], SAME_EVERYWHERE[k]) in bad else ''}" for k in same]
        rows.append([str(r["rank"]), r["host"], *versions_cells, index_cell,
                     "FAIL" if (r["rank"], "run.output_dir") in bad else "ok",
                     f"{r['clock'] - t0:+.2f}" + (" FAIL" if (r["rank"], "clock") in bad else ""),
                     "FAIL" if a.get("error") else f"{a['seconds'] * 1e3:.1f}", mem])
    out = [format_table(headers, rows)]
    i0 = records[0]["index"]
    out.append(f"data index (rank 0): {i0['path']}, {i0['samples']:,} samples, {i0['id']}" if i0.get("id") else
               f"data index (rank 0): {i0.get('note') or i0.get('error')}")
    a0 = records[0]["allreduce"]
    if not a0.get("error"):
        n = len(records)
        slowest = max(r["allreduce"].get("seconds", 0.0) for r in records)
        out.append(f"all-reduce of {a0['numel']:,} {a0['dtype']} ({a0['bytes'] / 1e6:.1f} MB, the gradient of one "
                   f"step) over {n} rank(s): {a0['seconds'] * 1e3:.1f} ms on rank 0, slowest rank "
                   f"{slowest * 1e3:.1f} ms; " + (f"bus bandwidth {a0['busbw_gbs']:.2f} GB/s" if n > 1
                                                   else "one rank: no traffic"))
    hosts = sorted({r["host"] for r in records})
    if problems:
        failing = sorted({p.host for p in problems})
        out.append(f"doctor: {len(problems)} problem(s) on host(s) {', '.join(failing)}:")
        out += [f"  {p}" for p in problems]
    else:
        out.append(f"doctor: all {len(records)} rank(s) on {len(hosts)} host(s) passed (clock limit "
                   f"{limits.max_clock_skew_s:g} s)")
    return "\n".join(out)


# ----------------------------------------------------------------------------- the rank's run

def doctor_parser() -> argparse.ArgumentParser:
    from hvpmtl.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="launchers/doctor.py", formatter_class=HelpFormatter, description="Pre-flight of every rank of a job "
                                "(started like launchers/pretrain.py); rank 0 prints the table. Exit 0 all passed, "
                                "2 config error, 5 a rank did not answer, 7 a check failed (the host is named).")
    add_doctor_options(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def add_doctor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the run's config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for launchers/pretrain.py (repeatable)")
    p.add_argument("--allreduce-numel", type=int, default=0,
                   help="elements of the timed all-reduce (default: the config's trainable parameters)")
    p.add_argument("--need-gb", type=float, default=None,
                   help="GPU memory a rank needs (default: the config's model states; activations come on top, "
                        "docs/BENCHMARKS.md)")
    p.add_argument("--max-clock-skew-s", type=float, default=5.0, help="largest clock difference allowed")
    p.add_argument("--min-busbw-gbs", type=float, default=0.0, help="fail below this all-reduce bus bandwidth "
                                                                   "(0: report only)")
    p.add_argument("--timeout-s", type=int, default=60, help="how long a collective waits for a missing rank")


def _timed_allreduce(numel: int, dtype, device, world: int, iters: int = 3) -> dict:
    import torch
    import torch.distributed as dist

    x = torch.ones(numel, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dist.all_reduce(x)  # warm-up: connections, NCCL's buffers
    times = []
    for _ in range(iters):
        x.fill_(1)
        sync()
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(x)
        sync()
        times.append(time.perf_counter() - t)
    seconds = sorted(times)[len(times) // 2]
    nbytes = numel * x.element_size()
    out = {"numel": numel, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes, "seconds": seconds,
           # nccl-tests' bus bandwidth: what each link carries in a ring all-reduce, comparable across world sizes
           "busbw_gbs": nbytes * 2 * (world - 1) / world / seconds / 1e9 if world > 1 else 0.0}
    ends = (float(x[0]), float(x[-1]))
    if ends != (world, world):
        out["error"] = f"all-reduce of ones summed to {ends}, not {world}: corrupted traffic"
    return out


def main(args: argparse.Namespace) -> int:
    """One rank's pre-flight; rank 0 prints the table. Every rank returns the same exit code."""
    from hvpmtl.config import ConfigError, check_batch_sizes, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except OSError as e:
        print(f"config error: cannot read {args.config}: {e.strerror or e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    from hvpmtl.train.runtime import prepare_deepspeed

    prepare_deepspeed()
    import torch
    import torch.distributed as dist

    from hvpmtl.dist import destroy_process_group, init_distributed
    from hvpmtl.train.runtime import DTYPES, resolve_precision

    rank, local_rank, world = init_distributed(timeout_s=args.timeout_s)
    host = socket.gethostname()
    try:  # the batch sizes at this world size, as training checks them: every rank refuses alike
        check_batch_sizes(cfg, world)
    except ConfigError as e:
        print(f"config error at {world} rank(s): {e}", file=sys.stderr, flush=True)
        destroy_process_group()
        return EXIT_CONFIG
    try:
        return _run(args, cfg, rank, local_rank, world, host, torch, dist, DTYPES[resolve_precision(cfg)],
                    resolve_precision(cfg))
    except (RuntimeError, dist.DistBackendError) as e:  # a collective timed out or a peer went away
        print(f"[hvpmtl doctor] {host} (rank {rank}): a collective failed, a rank is missing or hung "
              f"(waited up to {args.timeout_s} s): {type(e).__name__}: {str(e).splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    finally:
        destroy_process_group()


def _run(args, cfg, rank, local_rank, world, host, torch, dist, dtype, precision) -> int:
    from hvpmtl.data.formats.issues import DataError

    started = time.monotonic()
    rec: dict = {"rank": rank, "local_rank": local_rank, "host": host, "pid": os.getpid(),
                 "revision": revision(), "sources": sources_hash(), **versions(local_rank)}
    path = None
    try:
        path, note = index_path_of(cfg)
        rec["index"] = {"note": note} if path is None else index_identity(path)
    except DataError as e:
        if path is None:
            rec["index"] = {"error": str(e)}
        else:
            from hvpmtl.data.formats.index_fresh import index_command

            kind = "shards" if cfg.data.format == "shards" else "list"
            source = cfg.data.shards if kind == "shards" else cfg.data.list_file
            hint = (f"; build it once with `{index_command(kind, source, cfg.data.num_classes)}`"
                    if "no data index" in str(e) and source else "")
            rec["index"] = {"path": str(path), "error": f"{e}{hint}"}

    # run.output_dir: rank 0 makes it (as training does) and writes a probe; every rank must read that probe
    # and write its own into the same directory (ZeRO checkpoints are written by all ranks), which rank 0 must see
    out_dir = Path(cfg.run.output_dir).absolute()
    o: dict = {"path": str(out_dir), "errors": []}
    made, shared = False, [None, False]  # [nonce, rank 0 wrote its probe]
    if rank == 0:
        shared[0] = secrets.token_hex(6)
        try:
            made = not out_dir.exists()
            out_dir.mkdir(parents=True, exist_ok=True)
            o["mtime_offset_s"], err = write_probe(out_dir, shared[0], 0)
        except OSError as e:
            made, err = False, f"cannot create {out_dir}: {e.strerror or e}"
        shared[1] = not err
        if err:
            o["errors"].append(err)
            o["write_error"] = err
    if world > 1:
        dist.broadcast_object_list(shared, src=0)
    nonce, rank0_wrote = shared
    if rank != 0:
        err = read_probe(out_dir, nonce, 0) if rank0_wrote else ""
        if err:
            o["errors"].append(f"does not see rank 0's file: {err}: run.output_dir must be one shared directory")
        o["mtime_offset_s"], err = write_probe(out_dir, nonce, rank)
        if err:
            o["errors"].append(err)
            o["write_error"] = err
    if world > 1:
        dist.barrier()
    if rank == 0:
        o["unseen"] = [r for r in range(1, world) if read_probe(out_dir, nonce, r)]

    # clocks: read right after a barrier, so ranks differ by the barrier's latency (milliseconds) plus their skew
    if world > 1:
        dist.barrier()
    rec["clock"] = time.time()

    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    params, teacher = gradient_numel(cfg)
    numel = args.allreduce_numel or params
    try:
        rec["allreduce"] = _timed_allreduce(numel, dtype, device, world)
    except (MemoryError, torch.OutOfMemoryError) as e:
        rec["allreduce"] = {"error": f"no memory for {numel:,} {dtype}: {e}"[:300]}
    need = args.need_gb if args.need_gb is not None else \
        model_state_bytes(params, teacher, world, precision, zero_stage(cfg)) / GIB
    rec.update(memory=memory(local_rank), need_gb=need, params=params, seconds=time.monotonic() - started)
    rec["output_dir"] = o

    records = [None] * world
    if world > 1:
        dist.all_gather_object(records, rec)
    else:
        records = [rec]
    limits = Limits(args.max_clock_skew_s, args.min_busbw_gbs, args.need_gb)
    code = [EXIT_OK]
    if rank == 0:
        problems = compare(records, limits)
        print(report(records, problems, limits), flush=True)
        print(f"[hvpmtl doctor] {params:,} trainable parameters, {precision}, "
              f"{time.monotonic() - started:.1f} s on rank 0", flush=True)
        code[0] = EXIT_CHECK_FAILED if problems else EXIT_OK
    if world > 1:
        dist.broadcast_object_list(code, src=0)
    try:  # every rank removes its own probe once rank 0 has read them all
        (out_dir / probe_name(nonce, rank)).unlink(missing_ok=True)
    except OSError:
        pass
    if world > 1:
        dist.barrier()
    if made:
        try:
            out_dir.rmdir()  # the doctor leaves no empty run folder behind (training makes it again)
        except OSError:
            pass
    return int(code[0])


# ----------------------------------------------------------------------------- `hvpmtl doctor`

def launch_commands(config: str, overrides: list[str]) -> list[str]:
    """How to start the doctor on every node, as the run itself would start (printed by `hvpmtl doctor`)."""
    import shlex

    args = " ".join(["--config", shlex.quote(config), *(f"--set {shlex.quote(o)}" for o in overrides)])
    return [f"deepspeed --hostfile hosts --launcher pdsh --master_addr <first host> launchers/doctor.py {args}",
            f"sbatch --nodes N launchers/slurm/doctor.sbatch {args}",
            f"deepspeed --num_gpus N launchers/doctor.py {args}   # this node only (= hvpmtl doctor --local N)"]


def cli(args: argparse.Namespace) -> int:
    if not args.local:
        print("Start the pre-flight on every node of the job, through the launcher the run will use (rank 0 "
              "prints the table; exit 0 passed, 2 config error, 5 a rank did not answer, 7 a check failed):")
        for c in launch_commands(args.config, args.overrides):
            print(f"  {c}")
        print("or run it on this node's ranks now: hvpmtl doctor --local N ...")
        return 0
    cmd = ["deepspeed", "--num_gpus", str(args.local), str(ENTRY), "--config", args.config,
           *(x for o in args.overrides for x in ("--set", o)), "--timeout-s", str(args.timeout_s),
           "--max-clock-skew-s", str(args.max_clock_skew_s), "--min-busbw-gbs", str(args.min_busbw_gbs)]
    if args.allreduce_numel:
        cmd += ["--allreduce-numel", str(args.allreduce_numel)]
    if args.need_gb is not None:
        cmd += ["--need-gb", str(args.need_gb)]
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd[0] = str(deepspeed) if deepspeed.exists() else "deepspeed"
    return subprocess.call(cmd)


def add_parser(subparsers) -> None:
    from hvpmtl.cli import HelpFormatter

    p = subparsers.add_parser("doctor", help="pre-flight of every node of a job: prints how to start it, or runs "
                              "it on this node (--local N)", description=__doc__.split("\n\n")[0],
                              formatter_class=HelpFormatter)
    add_doctor_options(p)
    p.add_argument("--local", type=int, default=0, metavar="N",
                   help="run it now on N ranks of this node (deepspeed --num_gpus N); 0: print how to start it")
    p.set_defaults(func=cli)
