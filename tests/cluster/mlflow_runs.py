"""Reading training runs back from an MLflow tracking URI (the sqlite file the engine writes)."""
from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


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
