"""`hvpmtl tracking sync RUN_DIR`: send what a run left behind (the rows of metrics.jsonl MLflow misses, per
mlflow_run.json), then mark the MLflow run with the status its training ended with."""
from __future__ import annotations

import sys
from pathlib import Path

from hvpmtl.config import ConfigError
from hvpmtl.train.tracking.state import METRICS_FILE, STATE_FILE, read_state
from hvpmtl.train.tracking.tracker import Tracker


def sync(run_dir: str | Path, timeout_s: float = 600.0) -> int:
    """Send the rows of RUN_DIR/metrics.jsonl that MLflow has not got (per RUN_DIR/mlflow_run.json), then mark
    the run with the status its training ended with. Exit code 0 when MLflow has everything, 1 otherwise."""
    from hvpmtl.config import load_config

    run_dir = Path(run_dir)
    state = read_state(run_dir)
    if not state.get("tracking_uri"):
        print(f"hvpmtl: {run_dir / STATE_FILE} is missing or unreadable: nothing says where the run was logged",
              file=sys.stderr)
        return 1
    saved_cfg = run_dir / "config.yaml"
    try:
        cfg = load_config(saved_cfg if saved_cfg.is_file() else None, [f"run.output_dir={run_dir}",
                                                    f"tracking.tracking_uri={state['tracking_uri']}",
                                                    f"tracking.experiment={state['experiment']}"])
    except ConfigError as e:
        print(f"hvpmtl: config error: {e}", file=sys.stderr)
        return 1
    try:
        tracker = Tracker(cfg, active=True, run_id=state.get("run_id"), start_offset=int(state.get("synced_bytes", 0)))
    except ConfigError as e:
        print(f"hvpmtl: {e}", file=sys.stderr)
        return 1
    done = tracker.flush(timeout_s)
    final = state.get("final_status") or "FINISHED"
    tracker.close(final)
    print(f"[hvpmtl] {'MLflow has every row of' if done else 'MLflow is still missing rows of'} "
          f"{run_dir / METRICS_FILE} (run {tracker.run_id})")
    return 0 if done else 1


def add_parser(subparsers) -> None:
    """`hvpmtl tracking sync RUN_DIR`."""
    from hvpmtl.cli import HelpFormatter

    p = subparsers.add_parser("tracking", help="MLflow: send what a run logged while its server was away",
                              formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="tracking_command", required=True)
    s = sub.add_parser("sync", help="send the rows of RUN_DIR/metrics.jsonl that MLflow misses",
                       formatter_class=HelpFormatter)
    s.add_argument("run_dir", help="the run's run.output_dir (holds metrics.jsonl and mlflow_run.json)")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to keep trying")
    s.set_defaults(func=lambda a: sync(a.run_dir, a.timeout))
