"""Where to look at a run: the MLflow UI page of an experiment or run, for a server or a sqlite/file store."""
from __future__ import annotations

# MLflow 3.17's own UI follows its workflow switch besides the experiment's tag (check.py's EXPERIMENT_KIND): the link
# sets it to model training (runs, metrics)
UI_QUERY = "?workflowType=machine_learning"


def ui_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where to look at the run. For a sqlite/file store: the `mlflow ui` command and the page's path."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + UI_QUERY
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"
