"""What MLflow tracking costs the training loop per step, and what an outage of the server does to it.

Each case runs in its own process against a real store (a sqlite file, or a real `mlflow server` on 127.0.0.1
with one worker) and times, from the caller's side, one call per step logging 12 metrics (the loop's keys):

  sync          mlflow.log_metrics(...)                   (hvpmtl before: rank 0 blocks, every rank waits)
  mlflow-async  mlflow.log_metrics(..., synchronous=False) (MLflow's async queue: unbounded, drops on errors)
  tracker       hvpmtl.train.tracking.tracker.Tracker.log_metrics  (metrics.jsonl line + a background sender)

Outage (server only, async and tracker): 20 steps, the server stopped, 60 steps, the server started again,
20 steps, then close. Reported: the per-call cost during the outage, how long the final flush/close took, and
how many of the 100 steps MLflow has at the end. Requests are bounded the same way for both
(MLFLOW_HTTP_REQUEST_TIMEOUT=5, MAX_RETRIES=0), else MLflow's defaults (120 s, 7 retries) make each failed
call of the async queue wait minutes.

    python benchmarks/tracking_cost.py                 # every case, table + JSON
    python benchmarks/tracking_cost.py --steps 500 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ROOT, import_package  # noqa: E402

import_package()

KEYS = ("loss", "asl", "swav", "mim", "distill", "lr", "img_per_s", "epoch", "grad_norm", "mem_gib",
        "swav_entropy", "prototypes_used")
CASES = ["sync:sqlite", "mlflow-async:sqlite", "tracker:sqlite", "sync:server", "mlflow-async:server",
         "tracker:server", "mlflow-async:outage", "tracker:outage"]


def _metrics(step: int) -> dict:
    return {k: 1.0 / (step + i + 1) for i, k in enumerate(KEYS)}


def _stats(times: list[float]) -> dict:
    if not times:
        return {}
    s = sorted(times)
    return {"mean_ms": 1e3 * statistics.fmean(s), "p50_ms": 1e3 * s[len(s) // 2],
            "p99_ms": 1e3 * s[min(len(s) - 1, int(len(s) * 0.99))], "max_ms": 1e3 * s[-1]}


def run_case(case: str, steps: int, work: Path) -> dict:
    """One case in this process; returns its row."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    import mlflow
    from mlflow import MlflowClient

    from hvpmtl.config import load_config
    from tests.cluster.mlflow_runs import MlflowServer

    mode, store = case.split(":")
    server = None
    if store == "sqlite":
        uri = f"sqlite:///{work}/mlflow.db"
    else:
        server = MlflowServer(work / "server").start()
        uri = server.url
    outage = store == "outage"
    plan = [(1, 20, "before"), (21, 80, "outage"), (81, 100, "after")] if outage else [(1, steps, "up")]
    times: dict[str, list[float]] = {p: [] for _, _, p in plan}
    run_id = None
    try:
        if mode == "tracker":
            from hvpmtl.train.tracking.tracker import Tracker
            cfg = load_config(None, [f"run.output_dir={work / 'run'}", f"tracking.tracking_uri={uri}",
                                     "tracking.request_timeout_s=5", "tracking.request_retries=0",
                                     "tracking.close_timeout_s=120", "tracking.check_timeout_s=60"])
            tracker = Tracker(cfg, active=True)
            run_id = tracker.run_id
            assert run_id, "the store did not answer the start-up check"

            def log(step):
                tracker.log_metrics(_metrics(step), step)

            def finish():
                tracker.close()
        else:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment("bench")
            run_id = mlflow.start_run().info.run_id
            synchronous = mode == "sync"

            def log(step):
                mlflow.log_metrics(_metrics(step), step=step, synchronous=synchronous)

            def finish():
                mlflow.end_run()  # flushes the async queue
        for first, last, phase in plan:
            if phase == "outage":
                server.stop()
            if phase == "after":
                server.start()
            for s in range(first, last + 1):
                t0 = time.perf_counter()
                log(s)
                times[phase].append(time.perf_counter() - t0)
                time.sleep(0.01 if outage else 0)  # a step of the loop
        t0 = time.perf_counter()
        finish()
        close_s = time.perf_counter() - t0
        total = plan[-1][1]
        got = len({m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")})
    finally:
        if server is not None:
            server.stop()
    row = {"case": case, "steps": plan[-1][1], "close_s": close_s, "steps_in_mlflow": got, "steps_logged": total}
    for phase, ts in times.items():
        row[phase] = _stats(ts)
    return row


def table(rows: list[dict]) -> str:
    out = ["| case | per-call mean ms | p50 | p99 | max | during outage: mean / max ms | close s | steps in MLflow |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        up = r.get("up") or r.get("before")
        down = r.get("outage")
        down_s = f"{down['mean_ms']:.3f} / {down['max_ms']:.1f}" if down else ""
        out.append(f"| {r['case']} | {up['mean_ms']:.3f} | {up['p50_ms']:.3f} | {up['p99_ms']:.3f} | "
                   f"{up['max_ms']:.1f} | {down_s} | {r['close_s']:.2f} | {r['steps_in_mlflow']} of {r['steps_logged']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="logged steps per case (outage cases: always 100)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {','.join(CASES)}")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a single case, in this process (used by the parent)
    a = p.parse_args(argv)
    if a.one:
        with tempfile.TemporaryDirectory(prefix="hvpmtl-trk-") as d:
            print("ROW " + json.dumps(run_case(a.one, a.steps, Path(d))), flush=True)
        return 0
    rows = []
    for case in a.cases.split(","):
        t0 = time.perf_counter()
        p_ = subprocess.run([sys.executable, __file__, "--one", case, "--steps", str(a.steps)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
        found = [line[4:] for line in p_.stdout.splitlines() if line.startswith("ROW ")]
        row = json.loads(found[0]) if found else {"case": case, "error": (p_.stderr.strip().splitlines() or ["?"])[-1]}
        row["stderr_tail"] = p_.stderr[-1500:]
        rows.append(row)
        print(f"{case}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(table(rows))
    print("JSON " + json.dumps(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    sys.exit(main())
