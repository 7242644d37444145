"""The table rank 0 prints: one row per rank (a value that differs from most ranks' marked with *), the data index
and the all-reduce, then the problems or the all-clear."""
from __future__ import annotations

from hvpmtl.doctor.compare import SAME_EVERYWHERE, Limits, Problem


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
