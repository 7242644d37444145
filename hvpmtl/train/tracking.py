"""MLflow tracking from rank 0 only; every other rank gets a tracker that does nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path

from hvpmtl.config import ExperimentConfig, flatten, to_dict


def default_tracking_uri(cfg: ExperimentConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # embedded sqlite beside the run folders: nothing to start
    db = Path(cfg.run.output_dir).resolve().parent / "mlflow.db"
    return f"sqlite:///{db}"


class Tracker:
    def __init__(self, cfg: ExperimentConfig, active: bool, run_id: str | None = None):
        self.active = active and cfg.tracking.enabled
        self.run_id = run_id
        self.metrics_file = None
        if not active:
            return
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(out / "metrics.jsonl", "a", buffering=1)
        if not self.active:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self.mlflow = mlflow
        self.uri = default_tracking_uri(cfg)
        mlflow.set_tracking_uri(self.uri)
        name = cfg.tracking.experiment
        if self.uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
            # artifacts beside the database, not in ./mlruns of whatever directory the job started in
            store = Path(self.uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
            mlflow.create_experiment(name, artifact_location=store.as_uri())
        mlflow.set_experiment(name)
        # a resumed run continues the same MLflow run
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.run.name)
        self.run_id = run.info.run_id
        if run_id is None:
            params = {k: str(v)[:500] for k, v in flatten(to_dict(cfg)).items()}
            for i in range(0, len(params), 100):
                mlflow.log_params(dict(list(params.items())[i:i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.active:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()},
                                    step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self.mlflow.log_artifact(str(path), artifact_path)

    def log_image(self, image, name: str) -> None:
        if self.active:
            self.mlflow.log_image(image, name)

    def set_tags(self, tags: dict) -> None:
        if self.active:
            self.mlflow.set_tags(tags)

    def close(self, status: str = "FINISHED") -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self.active:
            self.mlflow.end_run(status=status)
            self.active = False
