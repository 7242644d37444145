"""The per-rank records compared: every problem they show (another version, data index or output directory,
a clock off, a slow or corrupt all-reduce, too little GPU memory), each naming the rank and host it is on."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Optional

# what must be the same on every rank (record key -> what the table and messages call it)
SAME_EVERYWHERE = {"revision": "hvpmtl revision", "sources": "hvpmtl sources (sha256 of hvpmtl/**/*.py)",
                   "python": "Python", "torch": "torch", "deepspeed": "DeepSpeed", "dali": "DALI",
                   "cuda": "CUDA (torch build)", "gpu": "GPU model"}


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
