"""The data accounting of a pre-training run reads right without the docs (issue 21): `data/left_out_total = 3000`
under `data/left_out_left_out = 0` read as "every sample left out", in a chart group of single points."""
from mlflow import MlflowClient


def test_data_accounting_is_counts_named_as_such_drawn_as_lines_and_tags(pretrain_run):
    client = MlflowClient(pretrain_run["tracking_uri"])
    run = client.search_runs([client.get_experiment_by_name("hvpmtl").experiment_id])[0]
    # what can change while training: every step, so MLflow draws a line (here at zero: nothing left out)
    assert sorted(k for k in run.data.metrics if k.startswith("data/")) == ["data/failed_reads", "data/left_out"]
    for key in ("data/left_out", "data/failed_reads"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert sorted((m.step, m.value) for m in hist) == [(1, 0.0), (2, 0.0)], key
    assert all(row["data/left_out"] == 0 for row in pretrain_run["metrics"] if "loss" in row)
    # what is fixed at start: tags, once
    tags = run.data.tags
    samples = int(tags["data.samples"])
    assert samples > 0 and tags["data.left_out"].startswith(f"0 of {samples} samples left out")
    assert [tags[f"data.left_out.{k}"] for k in ("parse_errors", "skip_list", "skip_corrupt")] == ["0", "0", "0"]
