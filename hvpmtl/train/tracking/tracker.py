"""What the training loop holds: `Tracker`, rank 0's metrics.jsonl and MLflow through the background sender
(hvpmtl/train/tracking/sender.py); on every other rank, and with tracking off, it sends nothing. No call of
the loop's waits for MLflow."""
from __future__ import annotations

import json
import time
from pathlib import Path

from hvpmtl.config import ExperimentConfig
from hvpmtl.train.tracking.check import Reachability, check_tracking
from hvpmtl.train.tracking.sender import Sender
from hvpmtl.train.tracking.state import METRICS_FILE


class Tracker:
    """Rank 0: metrics.jsonl + MLflow through a background sender. Other ranks: does nothing.

    Tracker(cfg, active, run_id) — run_id: the MLflow run to continue (from a checkpoint), or None for a new one.
    reach: the result of `connect`/`check_tracking` when the caller checked before building the model."""

    def __init__(self, cfg: ExperimentConfig, active: bool, run_id: str | None = None,
                 reach: Reachability | None = None, start_offset: int | None = None):
        self.cfg = cfg
        self.active = active and cfg.tracking.enabled
        self.run_id = run_id
        self.metrics_file = None
        self._sender = None
        if not active:
            return
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / METRICS_FILE
        self.metrics_file = open(self.metrics_path, "a", buffering=1)
        if not self.active:
            return
        if reach is None:
            reach = check_tracking(cfg)
        self.uri = reach.uri
        self._sender = Sender(self, reach, run_id, start_offset)
        self._sender.open_run_now()
        self._sender.start()

    # ------------------------------------------------------------------ the loop's side: never blocks on MLflow
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.metrics_file is None:
            return
        row = {"step": step, **metrics, "time": round(time.time(), 3)}
        self.metrics_file.write(json.dumps(row) + "\n")  # the sender reads it within SEND_EVERY_S

    def log_params(self, params: dict) -> None:
        if self._sender is not None:
            self._sender.put(("params", {k: str(v)[:500] for k, v in params.items()}))

    def log_config_changes(self, changes, step: int) -> None:
        """A resume that changed config keys (hvpmtl/train/resume_changes.py). MLflow refuses to change a logged
        parameter, so the run's parameters stay what it started with and each change is a new parameter
        `resumed_at_step_<N>/<key>` (the value from step N+1 on), with the tag `config.<key>` (tags can change) holding the
        value training uses now and `hvpmtl.config_changes.step_<N>` the changes the trainer printed."""
        if not changes:
            return
        self.log_params({f"resumed_at_step_{step}/{c.key}": c.new for c in changes})
        self.set_tags({**{f"config.{c.key}": c.new for c in changes},
                       f"hvpmtl.config_changes.step_{step}": "; ".join(str(c) for c in changes)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._sender is not None:
            self._sender.put(("artifact", (str(path), artifact_path)))

    def log_image(self, image, name: str) -> None:
        if self._sender is not None:
            self._sender.put(("image", (image, name)))

    def set_tags(self, tags: dict) -> None:
        if self._sender is not None:
            self._sender.put(("tags", {k: str(v) for k, v in tags.items()}))

    def flush(self, timeout_s: float) -> bool:
        """Wait until MLflow has everything logged so far (at most timeout_s); True when it has."""
        return self._sender is None or self._sender.flush(timeout_s)

    def close(self, status: str = "FINISHED") -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self._sender is not None:
            self._sender.finish(status, self.cfg.tracking.close_timeout_s)
            self._sender = None
        self.active = False
