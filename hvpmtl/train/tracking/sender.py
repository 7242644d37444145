"""The background thread of rank 0's Tracker: opens (or reopens) the MLflow run, tails metrics.jsonl and sends its
new rows in batches, sends the queued rarer calls (params, tags, artifacts, image panels), and rides out outages
(retried with backoff for as long as training runs; refused requests skipped after REFUSED_TRIES), recording
what MLflow has in mlflow_run.json."""
from __future__ import annotations

import logging
import queue
import threading
import time

from hvpmtl.config import flatten, to_dict
from hvpmtl.train.tracking.check import Reachability, get_or_create_experiment, mlflow_client, one_line, say
from hvpmtl.train.tracking.state import METRICS_FILE, STATE_FILE, read_state, rows_to_metrics, write_state
from hvpmtl.train.tracking.ui import ui_link

MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_CALL = 100
READ_CHUNK = 4 << 20  # bytes of metrics.jsonl parsed per pass
MAX_PENDING_OPS = 256
BACKOFF_S = (1, 2, 4, 8, 16, 30)
SEND_EVERY_S = 1.0  # the sender batches the rows of about a second: one request, not one per step
REFUSED_TRIES = 3  # a refused request is tried this many times before it is skipped (some 4xx are transient)


def _is_refusal(e: Exception) -> bool:
    """A request MLflow refused (4xx): sending it again is unlikely to succeed. Anything else (no connection,
    timeout, 5xx, a locked sqlite file) is an outage and is retried for as long as it lasts."""
    status = getattr(e, "get_http_status_code", None)
    if status is None:
        return False
    code = status()
    return 400 <= code < 500 and code not in (408, 429)



class _QuietSenderThread(logging.Filter):
    """MLflow and urllib3 log every failed attempt (with a traceback for sqlite); during an outage the sender
    retries for as long as it lasts, and has already said so once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not threading.current_thread().name.startswith("hvpmtl-tracking")


_QUIET = _QuietSenderThread()
for _name in ("mlflow.store.db.utils", "mlflow.utils.request_utils", "mlflow.utils.rest_utils",
              "urllib3.connectionpool"):
    logging.getLogger(_name).addFilter(_QUIET)


class Sender(threading.Thread):
    """The background thread of a Tracker: opens (or reopens) the MLflow run, tails metrics.jsonl, sends the
    queued calls, and rides out outages."""

    def __init__(self, tracker, reach: Reachability, run_id: str | None, start_offset: int | None):
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
        saved = read_state(tracker.out)
        self.saved = saved
        size = tracker.metrics_path.stat().st_size
        # a continued run resumes sending where the previous process stopped; a new run starts at the end of
        # metrics.jsonl (lines above it belong to an earlier run in this folder)
        same = bool(run_id) and saved.get("run_id") == run_id and saved.get("tracking_uri") == self.uri
        self.offset = int(saved.get("synced_bytes", size)) if same and saved.get("synced_bytes", 0) <= size else size
        if start_offset is not None:  # `sync`: from where the run's sender stopped, created or not
            self.offset = min(start_offset, size)
        self.sent_offset = self.offset
        self.client = mlflow_client(self.uri)

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
                    say(f"WARNING: more than {MAX_PENDING_OPS} MLflow calls (tags, artifacts, panels) wait for "
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
            say(f"WARNING: MLflow at {self.uri} did not take the last metrics within tracking.close_timeout_s="
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
            self.experiment_id = get_or_create_experiment(self.uri, self.cfg.tracking.experiment)
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
                say(f"MLflow: continuing run {self.resume_id}: {ui_link(self.uri, self.experiment_id, self.resume_id)}")
                return
            logged_to = self.saved.get("tracking_uri") if self.saved.get("run_id") == self.resume_id else None
            say(f"WARNING: the checkpoint's MLflow run {self.resume_id} does not exist at {self.uri}; "
                 f"it was logged to {logged_to or 'another tracking store (not recorded: no ' + STATE_FILE + ')'}. "
                 f"Continuing in a new MLflow run tagged hvpmtl.resumed_from_run_id={self.resume_id}. To continue "
                 f"the old run instead, stop and set tracking.tracking_uri={logged_to or '<that URI>'}.")
            tags = {"hvpmtl.resumed_from_run_id": self.resume_id,
                    "hvpmtl.resumed_from_tracking_uri": logged_to or "unknown"}
        run = client.create_run(self.experiment_id, run_name=cfg.run.name, tags=tags)
        self.t.run_id = run.info.run_id
        self.run_open = True
        self._record()
        say(f"MLflow run {run.info.run_id}: {ui_link(self.uri, self.experiment_id, run.info.run_id)}")
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
                say(f"WARNING: MLflow refused {kind} {REFUSED_TRIES} times ({one_line(e)}); skipped")
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
                    say(f"WARNING: MLflow refused {min(MAX_METRICS_PER_CALL, len(metrics) - i)} metrics "
                         f"{REFUSED_TRIES} times ({one_line(e)}); skipped")
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
            self.down_reason = one_line(e)
            say(f"WARNING: MLflow at {self.uri} is not answering ({self.down_reason}). Training goes on; "
                 f"every step is in {self.t.metrics_path} and is sent when MLflow is back. (Said once.)")

    def _came_back(self) -> None:
        away = time.monotonic() - self.down_since
        self.outages.append(away)
        self.down_since = None
        say(f"MLflow at {self.uri} is answering again after {away:.0f} s; caught up to "
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
            write_state(self.t.out, state)
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
