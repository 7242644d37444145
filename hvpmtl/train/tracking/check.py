"""Reaching the tracking store at start-up, before any model is built: the URI, the experiment (got or created and
marked as a model-training one), and tracking.on_unreachable's verdict when the store does not answer within
tracking.check_timeout_s (`check_tracking` on rank 0; `connect`, agreed by every rank)."""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hvpmtl.config import ConfigError, ExperimentConfig, check_tracking_uri
from hvpmtl.train.tracking.state import METRICS_FILE

# MLflow 3.x reads this experiment tag to open an experiment as a model-training one (runs, metrics) rather than
# as a GenAI app (traces, overview); 3.17's own UI also follows its workflow switch, which the printed link sets
# (hvpmtl/train/tracking/ui.py).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class TrackingUnreachable(ConfigError):
    """The tracking store could not be reached at start and tracking.on_unreachable is `fail` (exit 2)."""


def default_tracking_uri(cfg: ExperimentConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        try:
            return check_tracking_uri(os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    # embedded sqlite beside the run folders: nothing to start
    db = Path(cfg.run.output_dir).resolve().parent / "mlflow.db"
    return f"sqlite:///{db}"


def say(msg: str) -> None:
    print(f"[hvpmtl] {msg}", file=sys.stderr, flush=True)


def _bound_requests(cfg: ExperimentConfig) -> None:
    """MLflow reads these at each request: one request takes at most timeout x (retries + 1) plus backoff."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.tracking.request_timeout_s)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.tracking.request_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def get_or_create_experiment(uri: str, name: str) -> str:
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            # artifacts beside the database, not in ./mlruns of whatever directory the job started in
            location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except Exception:  # noqa: BLE001 — another job created it in between
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(f"tracking.experiment: the experiment '{name}' at {uri} is deleted; restore it "
                          f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or choose another name")
    if "mlflow.experimentKind" not in exp.tags:  # an experiment made before: mark it, unless the user chose
        client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


@dataclass
class Reachability:
    """What `check_tracking` found: the experiment id, or None with the reason when the store was unreachable."""
    uri: str
    experiment_id: str | None
    error: str = ""


def check_tracking(cfg: ExperimentConfig) -> Reachability:
    """Reach the tracking store and get or create the experiment, in at most tracking.check_timeout_s.

    Raises TrackingUnreachable when it cannot and tracking.on_unreachable is `fail`; otherwise returns with
    experiment_id None after a loud warning."""
    t = cfg.tracking
    _bound_requests(cfg)
    uri = default_tracking_uri(cfg)
    result: dict = {}

    def attempt():
        try:
            result["id"] = get_or_create_experiment(uri, t.experiment)
        except ConfigError as e:
            result["config_error"] = e
        except Exception as e:  # noqa: BLE001 — any failure here means "unreachable", reported below
            result["error"] = one_line(e)

    # a thread with a deadline: a hung NFS sqlite file or a black-holed address cannot hold the start-up
    th = threading.Thread(target=attempt, name="hvpmtl-tracking-check", daemon=True)
    t0 = time.monotonic()
    th.start()
    th.join(t.check_timeout_s)
    if "config_error" in result:
        raise result["config_error"]
    if "id" in result:
        return Reachability(uri, result["id"])
    why = result.get("error") or f"no answer within tracking.check_timeout_s={t.check_timeout_s:g} s"
    if t.on_unreachable == "fail":
        raise TrackingUnreachable(
            f"tracking.tracking_uri: cannot reach MLflow at {uri} ({why}, after {time.monotonic() - t0:.1f} s). "
            f"Start the tracking server or fix the URI (tracking.tracking_uri or $MLFLOW_TRACKING_URI), or set "
            f"tracking.on_unreachable=continue to train anyway (metrics.jsonl keeps every step) or "
            f"tracking.enabled=false")
    say(f"WARNING: MLflow at {uri} is unreachable ({why}). Training goes on (tracking.on_unreachable=continue): "
         f"every step is written to {Path(cfg.run.output_dir) / METRICS_FILE}, and the MLflow run is created and "
         f"caught up as soon as the server answers.")
    return Reachability(uri, None, why)


def connect(cfg: ExperimentConfig, is_main: bool, device) -> Reachability | None:
    """The start-up check on rank 0, agreed by every rank (one small collective): call it after the process
    group is up and before the model is built. Raises TrackingUnreachable on every rank when rank 0 must stop."""
    import torch

    from hvpmtl.dist import sum_to_host

    reach, err = None, None
    if is_main and cfg.tracking.enabled:
        try:
            reach = check_tracking(cfg)
        except ConfigError as e:  # unreachable under `fail`, or a URI that can never work: every rank stops
            err = e
    if sum_to_host(torch.tensor([float(err is not None)], device=device))[0] > 0:
        raise err or TrackingUnreachable("tracking: rank 0 cannot use the tracking store (its message says why)")
    return reach
