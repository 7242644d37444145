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

    check.py    the start-up check: the URI, the experiment, tracking.on_unreachable (`check_tracking`, `connect`)
    tracker.py  `Tracker`, what the loop holds: one line per step, the rarer calls queued
    sender.py   the background thread: batches to MLflow, outages, what was sent
    state.py    the run folder's metrics.jsonl and mlflow_run.json
    sync.py     `hvpmtl tracking sync RUN_DIR`
    ui.py       the link to the run's page
Import each name from its module (`from hvpmtl.train.tracking.tracker import Tracker`).
"""
