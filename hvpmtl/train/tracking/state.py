"""What a run's folder holds for tracking: metrics.jsonl (every step's row, the sender's backlog) and
mlflow_run.json (where the run is logged and how many bytes of metrics.jsonl MLflow has), read by a resumed run
and by `hvpmtl tracking sync`."""
from __future__ import annotations

import json
import time
from pathlib import Path

from hvpmtl.fileio import atomic_write

STATE_FILE = "mlflow_run.json"
METRICS_FILE = "metrics.jsonl"


def read_state(out: Path) -> dict:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_state(out: Path, state: dict) -> None:
    atomic_write(out / STATE_FILE, json.dumps(state, indent=1), f".{STATE_FILE}.tmp")


def rows_to_metrics(lines: list[bytes]):
    """metrics.jsonl lines -> (MLflow Metric entities, first step, last step). Lines that are not JSON objects
    with a step (a torn write) are skipped; `time` is the row's timestamp, not a metric."""
    from mlflow.entities import Metric

    out, first, last = [], None, None
    for line in lines:
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        ts = int(float(row.pop("time", time.time())) * 1000)
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(Metric(k, float(v), ts, step))
        first = step if first is None else first
        last = step
    return out, first, last
