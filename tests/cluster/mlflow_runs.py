"""Reading training runs back from an MLflow tracking URI (the sqlite file the engine writes)."""
from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from .procs import free_port  # noqa: E402


def all_runs(uri: str, experiment: str = "hvpmtl") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment '{experiment}' at {uri}"
    return client.search_runs([exp.experiment_id])


def finished_runs(uri: str, experiment: str = "hvpmtl") -> list:
    return [r for r in all_runs(uri, experiment) if r.info.status == "FINISHED"]


def metric_steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted({m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)})


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, one worker) that a test can stop and start again on
    the same port and database, to play a tracking-server outage."""

    def __init__(self, directory, port: int | None = None):
        from pathlib import Path
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        import subprocess
        import sys
        import time
        import urllib.request
        from pathlib import Path
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        log = open(self.dir / "server.log", "a")
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
        self.proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{self.dir}/mlflow.db",
             "--artifacts-destination", str(self.dir / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not come up: {(self.dir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def stop(self, abrupt: bool = False) -> None:
        """SIGTERM (a graceful stop, up to 15 s), or `abrupt`: SIGKILL at once, an outage that starts now."""
        import signal
        import subprocess
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL if abrupt else signal.SIGTERM)
            self.proc.wait(15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
