"""MLflow tracking from rank 0, off the training loop's critical path; every other rank gets a tracker that
does nothing.

What the loop pays per step is one line appended to <run.output_dir>/metrics.jsonl (written synchronously,
line-buffered: microseconds). A background thread of rank 0 tails that file and sends the new rows to MLflow in
batches (`log_batch`, <= 1000 metrics a call); the rarer calls (params, tags, artifacts, image panels) go through a
small bounded queue to the same thread. So no rank ever waits for the tracking server: the other ranks only wait at
the next collective for rank 0, and rank 0 does not wait for MLflow.

Outages: a failed send is retried with backoff (1 s doubling to 30 s) for as long as training runs; the first
failure prints one warning and the recovery prints one line saying how long MLflow was away. metrics.jsonl is the
backlog, so nothing is dropped and memory does not grow; when MLflow is back the thread sends what it missed
(rows keep the time they were logged at) and tags the run with the outages it lived through. Only the rarer calls
can be dropped: when their queue (256 entries) is full, the oldest goes, counted and reported. What has been sent
is recorded in <run.output_dir>/mlflow_run.json (tracking URI, run id, bytes of metrics.jsonl sent), so a resumed
run catches up on what the previous process could not send, and `hvpmtl tracking sync RUN_DIR`
does it by hand. `close()` waits at most tracking.close_timeout_s for the thread to catch up, then says what is
missing and leaves.

Start-up: `check_tracking` reaches the store and gets or creates the experiment within tracking.check_timeout_s,
before any model is built. When it cannot, tracking.on_unreachable decides: `continue` (default: on a large
allocation a dead tracking server must not idle the GPUs; training runs, metrics.jsonl has every step, and the
thread keeps trying and creates the MLflow run when the server comes up) or `fail` (exit 2 within seconds).

Each HTTP request of the MLflow client is bounded by tracking.request_timeout_s and tracking.request_retries
(MLflow's own defaults are 120 s and 7 retries: minutes per call).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hvpmtl.config import ConfigError, ExperimentConfig, check_tracking_uri, flatten, to_dict
from hvpmtl.fileio import atomic_write

# MLflow 3.x reads this experiment tag to open an experiment as a model-training one (runs, metrics) rather than
# as a GenAI app (traces, overview); 3.17's own UI also follows its workflow switch, which the printed link sets.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_QUERY = "?workflowType=machine_learning"
STATE_FILE = "mlflow_run.json"
METRICS_FILE = "metrics.jsonl"
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_CALL = 100
READ_CHUNK = 4 << 20  # bytes of metrics.jsonl parsed per pass
MAX_PENDING_OPS = 256
BACKOFF_S = (1, 2, 4, 8, 16, 30)
SEND_EVERY_S = 1.0  # the sender batches the rows of about a second: one request, not one per step


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


def _say(msg: str) -> None:
    print(f"[hvpmtl] {msg}", file=sys.stderr, flush=True)


def _bound_requests(cfg: ExperimentConfig) -> None:
    """MLflow reads these at each request: one request takes at most timeout x (retries + 1) plus backoff."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.tracking.request_timeout_s)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.tracking.request_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


REFUSED_TRIES = 3  # a refused request is tried this many times before it is skipped (some 4xx are transient)


def _is_refusal(e: Exception) -> bool:
    """A request MLflow refused (4xx): sending it again is unlikely to succeed. Anything else (no connection,
    timeout, 5xx, a locked sqlite file) is an outage and is retried for as long as it lasts."""
    status = getattr(e, "get_http_status_code", None)
    if status is None:
        return False
    code = status()
    return 400 <= code < 500 and code not in (408, 429)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def ui_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where to look at the run. For a sqlite/file store: the `mlflow ui` command and the page's path."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + UI_QUERY
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def _get_or_create_experiment(uri: str, name: str) -> str:
    client = _client(uri)
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
            result["id"] = _get_or_create_experiment(uri, t.experiment)
        except ConfigError as e:
            result["config_error"] = e
        except Exception as e:  # noqa: BLE001 — any failure here means "unreachable", reported below
            result["error"] = _one_line(e)

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
    _say(f"WARNING: MLflow at {uri} is unreachable ({why}). Training goes on (tracking.on_unreachable=continue): "
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


def _read_state(out: Path) -> dict:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(out: Path, state: dict) -> None:
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
        self._sender = _Sender(self, reach, run_id, start_offset)
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


class _QuietSenderThread(logging.Filter):
    """MLflow and urllib3 log every failed attempt (with a traceback for sqlite); during an outage the sender
    retries for as long as it lasts, and has already said so once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not threading.current_thread().name.startswith("hvpmtl-tracking")


_QUIET = _QuietSenderThread()
for _name in ("mlflow.store.db.utils", "mlflow.utils.request_utils", "mlflow.utils.rest_utils",
              "urllib3.connectionpool"):
    logging.getLogger(_name).addFilter(_QUIET)


class _Sender(threading.Thread):
    """The background thread of a Tracker: opens (or reopens) the MLflow run, tails metrics.jsonl, sends the
    queued calls, and rides out outages."""

    def __init__(self, tracker: Tracker, reach: Reachability, run_id: str | None, start_offset: int | None):
        super().__init__(name="hvpmtl-tracking-sender", daemon=True)
        self.t = tracker
        self.cfg = tracker.cfg
        self.uri = reach.uri
        self.experiment_id = reach.experiment_id
        self.resume_id = run_id
        self.wake = threading.Event()
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._idle = threading.Condition()
        self.ops: queue.Queue = queue.Queue()
        self.dropped_ops = 0
        self.refusals = 0
        self.status: str | None = None
        self.run_open = False
        self.down_since: float | None = None
        self.down_reason = ""
        self.outages: list[float] = []
        if reach.experiment_id is None:  # check_tracking has warned already
            self.down_since, self.down_reason = time.monotonic(), reach.error
        saved = _read_state(tracker.out)
        self.saved = saved
        size = tracker.metrics_path.stat().st_size
        # a continued run resumes sending where the previous process stopped; a new run starts at the end of
        # metrics.jsonl (lines above it belong to an earlier run in this folder)
        same = bool(run_id) and saved.get("run_id") == run_id and saved.get("tracking_uri") == self.uri
        self.offset = int(saved.get("synced_bytes", size)) if same and saved.get("synced_bytes", 0) <= size else size
        if start_offset is not None:  # `sync`: from where the run's sender stopped, created or not
            self.offset = min(start_offset, size)
        self.sent_offset = self.offset
        self.client = _client(self.uri)

    # ------------------------------------------------------------------ called from the training thread
    def put(self, op) -> None:
        self.ops.put(op)
        if self.ops.qsize() > MAX_PENDING_OPS:  # bounded: the oldest call goes, counted
            try:
                self.ops.get_nowait()
            except queue.Empty:
                pass
            else:
                self.dropped_ops += 1
                if self.dropped_ops == 1:
                    _say(f"WARNING: more than {MAX_PENDING_OPS} MLflow calls (tags, artifacts, panels) wait for "
                         f"the server; the oldest are dropped and counted (tag hvpmtl.tracking_dropped_calls)")
        self.wake.set()

    def open_run_now(self) -> None:
        """Open the run before training starts when the store answered the check, so checkpoints carry its id.
        An error here (the server died since the check) makes it the thread's job, like any outage."""
        if self.experiment_id is None:
            return
        try:
            self._open_run()
        except Exception as e:  # noqa: BLE001
            self._went_down(e)

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while not self._caught_up():
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    return self._caught_up()
                self.wake.set()
                self._idle.wait(min(left, 0.5))
        return True

    def finish(self, status: str, timeout_s: float) -> None:
        self.status = status
        self._stopping.set()
        self.wake.set()
        self.join(timeout_s)
        if self.is_alive():
            self._abandon.set()
            self._record()
            steps = self._pending_steps()
            _say(f"WARNING: MLflow at {self.uri} did not take the last metrics within tracking.close_timeout_s="
                 f"{self.cfg.tracking.close_timeout_s:g} s ({self.down_reason or 'still sending'}). Missing from "
                 f"the MLflow run {self.t.run_id or '(not created)'}: {steps}; they are all in {self.t.metrics_path}. "
                 f"They are sent when this run resumes, or now with: "
                 f"hvpmtl tracking sync {self.t.out}")

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        failures = 0
        while not self._abandon.is_set():
            stopping = self._stopping.is_set()
            try:
                if not self.run_open:
                    self._reopen()
                self._send_ops()
                self._send_metrics()
                if self.down_since is not None:
                    self._came_back()
                failures = 0
            except Exception as e:  # noqa: BLE001 — every failure is an outage or reported, never fatal
                self._went_down(e)
                # while closing, retry often: close() waits a bounded time for the server to come back
                wait = BACKOFF_S[min(failures, 2 if stopping else len(BACKOFF_S) - 1)]
                (self._abandon if stopping else self._stopping).wait(wait)
                failures += 1
                continue
            with self._idle:
                self._idle.notify_all()
            if stopping and self._caught_up():
                self._end_run()
                return
            self.wake.wait(SEND_EVERY_S)
            self.wake.clear()

    def _caught_up(self) -> bool:
        return self.run_open and self.ops.empty() and self.sent_offset >= self._file_size()

    def _file_size(self) -> int:
        try:
            return self.t.metrics_path.stat().st_size
        except OSError:
            return self.sent_offset

    def _reopen(self) -> None:
        if self.experiment_id is None:
            self.experiment_id = _get_or_create_experiment(self.uri, self.cfg.tracking.experiment)
        self._open_run()

    def _open_run(self) -> None:
        client, cfg = self.client, self.cfg
        tags = {}
        if self.resume_id:
            from mlflow.exceptions import MlflowException
            try:
                run = client.get_run(self.resume_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run = None
            if run is not None and run.info.lifecycle_stage != "deleted":
                client.update_run(self.resume_id, status="RUNNING")
                self.t.run_id = self.resume_id
                self.run_open = True
                self._record()
                _say(f"MLflow: continuing run {self.resume_id}: {ui_link(self.uri, self.experiment_id, self.resume_id)}")
                return
            logged_to = self.saved.get("tracking_uri") if self.saved.get("run_id") == self.resume_id else None
            _say(f"WARNING: the checkpoint's MLflow run {self.resume_id} does not exist at {self.uri}; "
                 f"it was logged to {logged_to or 'another tracking store (not recorded: no ' + STATE_FILE + ')'}. "
                 f"Continuing in a new MLflow run tagged hvpmtl.resumed_from_run_id={self.resume_id}. To continue "
                 f"the old run instead, stop and set tracking.tracking_uri={logged_to or '<that URI>'}.")
            tags = {"hvpmtl.resumed_from_run_id": self.resume_id,
                    "hvpmtl.resumed_from_tracking_uri": logged_to or "unknown"}
        run = client.create_run(self.experiment_id, run_name=cfg.run.name, tags=tags)
        self.t.run_id = run.info.run_id
        self.run_open = True
        self._record()
        _say(f"MLflow run {run.info.run_id}: {ui_link(self.uri, self.experiment_id, run.info.run_id)}")
        params = {k: str(v)[:500] for k, v in flatten(to_dict(cfg)).items()}
        self._log_params(params)

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.t.run_id, params=items[i:i + MAX_PARAMS_PER_CALL], synchronous=True)

    def _send_ops(self) -> None:
        from mlflow.entities import RunTag
        while True:
            try:
                kind, arg = self.ops.queue[0]  # peek: an op leaves the queue only once it is sent (or refused)
            except IndexError:
                return
            try:
                if kind == "params":
                    self._log_params(arg)
                elif kind == "tags":
                    self.client.log_batch(self.t.run_id, tags=[RunTag(k, v) for k, v in arg.items()],
                                          synchronous=True)
                elif kind == "artifact":
                    self.client.log_artifact(self.t.run_id, *arg)
                elif kind == "image":
                    self.client.log_image(self.t.run_id, arg[0], artifact_file=arg[1])
            except Exception as e:  # noqa: BLE001
                if not self._give_up(e):
                    raise
                _say(f"WARNING: MLflow refused {kind} {REFUSED_TRIES} times ({_one_line(e)}); skipped")
            try:
                self.ops.get_nowait()
            except queue.Empty:
                return

    def _send_metrics(self) -> None:
        while True:
            with open(self.t.metrics_path, "rb") as f:
                f.seek(self.offset)
                data = f.read(READ_CHUNK)
            end = data.rfind(b"\n")
            if end < 0:
                return  # nothing new, or one line still being written
            lines = data[:end].split(b"\n")
            metrics, _, _ = rows_to_metrics(lines)
            for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
                try:
                    self.client.log_batch(self.t.run_id, metrics=metrics[i:i + MAX_METRICS_PER_CALL],
                                          synchronous=True)
                except Exception as e:  # noqa: BLE001
                    if not self._give_up(e):
                        raise  # retried from self.offset: a batch sent twice logs the same (step, value) again
                    _say(f"WARNING: MLflow refused {min(MAX_METRICS_PER_CALL, len(metrics) - i)} metrics "
                         f"{REFUSED_TRIES} times ({_one_line(e)}); skipped")
            self.offset += end + 1
            self.sent_offset = self.offset
            self._record()

    def _give_up(self, e: Exception) -> bool:
        """True when the request is to be skipped: refused (4xx) REFUSED_TRIES times in a row."""
        self.refusals = self.refusals + 1 if _is_refusal(e) else 0
        if self.refusals >= REFUSED_TRIES:
            self.refusals = 0
            return True
        return False

    def _went_down(self, e: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.down_reason = _one_line(e)
            _say(f"WARNING: MLflow at {self.uri} is not answering ({self.down_reason}). Training goes on; "
                 f"every step is in {self.t.metrics_path} and is sent when MLflow is back. (Said once.)")

    def _came_back(self) -> None:
        away = time.monotonic() - self.down_since
        self.outages.append(away)
        self.down_since = None
        _say(f"MLflow at {self.uri} is answering again after {away:.0f} s; caught up to "
             f"{self._file_size()} bytes of {METRICS_FILE}")
        from mlflow.entities import RunTag
        self.client.log_batch(self.t.run_id, tags=[
            RunTag("hvpmtl.tracking_outages", f"{len(self.outages)} outage(s), {sum(self.outages):.0f} s in all; "
                                              f"every row sent after it (metrics.jsonl is the backlog)")],
            synchronous=True)

    def _end_run(self) -> None:
        if self.dropped_ops:
            from mlflow.entities import RunTag
            self.client.log_batch(self.t.run_id, tags=[RunTag("hvpmtl.tracking_dropped_calls",
                                                              str(self.dropped_ops))], synchronous=True)
        self.client.set_terminated(self.t.run_id, self.status or "FINISHED")
        self._record(status=self.status)

    def _record(self, status: str | None = None) -> None:
        state = {"tracking_uri": self.uri, "experiment": self.cfg.tracking.experiment,
                 "experiment_id": self.experiment_id, "run_id": self.t.run_id, "synced_bytes": self.sent_offset,
                 "status": status or ("RUNNING" if self.run_open else "NOT_CREATED")}
        if self.experiment_id is not None:
            state["ui"] = ui_link(self.uri, self.experiment_id, self.t.run_id)
        if self.status and not status:
            state["final_status"] = self.status
        try:
            _write_state(self.t.out, state)
        except OSError:
            pass

    def _pending_steps(self) -> str:
        try:
            with open(self.t.metrics_path, "rb") as f:
                f.seek(self.sent_offset)
                _, first, last = rows_to_metrics(f.read().split(b"\n"))
        except OSError:
            return "unknown steps"
        return "no metrics" if first is None else f"steps {first}..{last}"


# ---------------------------------------------------------------------------- `sync`: send what a run left behind
def sync(run_dir: str | Path, timeout_s: float = 600.0) -> int:
    """Send the rows of RUN_DIR/metrics.jsonl that MLflow has not got (per RUN_DIR/mlflow_run.json), then mark
    the run with the status its training ended with. Exit code 0 when MLflow has everything, 1 otherwise."""
    from hvpmtl.config import load_config

    run_dir = Path(run_dir)
    state = _read_state(run_dir)
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
