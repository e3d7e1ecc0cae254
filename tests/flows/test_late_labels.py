"""The drift check without labels, then with late labels, and retraining data that holds drifted rows back: real
Prefect flows, MLflow and DVC on a project whose registry holds hand-made ONNX versions (tests/helpers)."""

import pandas as pd
import pytest
from prefect import flow

from flows.drift import drift_check
from flows.score import batch_scoring
from ottimo import vocab
from ottimo.monitor import ledger, simulate
from tasks.drift import Window, add_training_data
from tests.helpers.loop_helpers import loop_project

QUIET = {"drift": {"min_rows": 60, "rollback_margin": 100.0, "max_quality_drop": 100.0}}  # random models: no action


@pytest.mark.slow
def test_an_unlabelled_window_is_judged_by_the_estimate_then_late_labels_replace_it(tmp_path, prefect_harness):
    root, params, _, _, _ = loop_project(tmp_path / "project", QUIET, versions=2)
    incoming = root / params.score.incoming
    test = pd.read_parquet(root / "data" / "prepared" / "test.parquet")
    features = [c for c in test.columns if c != "target"]
    batch = simulate.batches(test, features, "target", "none", 0, 1, 100, seed=1)[0]
    simulate.write([batch.drop(columns=["target"])], incoming, "a")
    assert batch_scoring(project_dir=str(root), return_state=True).is_completed()

    summary = drift_check(project_dir=str(root), return_state=True).result()
    assert summary.action == "nothing", summary.reasons
    assert "no labels: quality not measured" in summary.reasons[0]
    assert any(r.startswith("estimated accuracy without labels (CBPE)") for r in summary.reasons)
    assert any(r.startswith("prediction drift: ") for r in summary.reasons)
    ev = summary.evidence
    assert ev["labelled_rows"] == 0 and ev["accuracy"] is None
    assert ev["estimate_low"] <= ev["estimated_accuracy"] <= ev["estimate_high"]
    assert ev["estimated_previous_accuracy"] is not None and ev["multivariate_ratio"] is not None
    client, exp = ledger.connect_monitoring(root, params)
    run = client.get_run(summary.run_id)
    assert run.data.tags[vocab.QUALITY_SOURCE] == "estimate" and "accuracy" not in run.data.metrics

    # labels for 80 of the 100 rows come a day later, naming the scored batch's rows
    made = pd.read_parquet(incoming / "a-000.predictions.parquet")["prediction"].to_numpy()
    late = pd.DataFrame({"batch": "a-000.parquet", "row": range(80), "target": batch["target"].iloc[:80]})
    (incoming / "labels").mkdir()
    late.to_csv(incoming / "labels" / "day-2.csv", index=False)
    again = drift_check(project_dir=str(root), return_state=True).result()
    assert again.action == "insufficient data"  # nothing new was scored
    run = client.get_run(summary.run_id)
    truth = float((made[:80] == batch["target"].iloc[:80].to_numpy()).mean())
    assert run.data.tags[vocab.QUALITY_SOURCE] == "realized"
    assert abs(run.data.metrics["accuracy"] - truth) < 1e-9 and run.data.metrics["realized_labelled_rows"] == 80
    assert (incoming / "labels" / "done" / "day-2.csv").is_file() and not (incoming / "labels" / "day-2.csv").exists()


@pytest.mark.slow
def test_retraining_data_holds_back_rows_far_outside_the_training_range(tmp_path, prefect_harness):
    root, params, _, _, _ = loop_project(tmp_path / "project", QUIET, versions=1)
    test = pd.read_parquet(root / "data" / "prepared" / "test.parquet")
    stuck = test.iloc[:100].reset_index(drop=True)
    stuck.loc[:9, "pixel_3_4"] = 38.8  # the step change: training never exceeds 16
    path = root / "data" / "incoming" / "stuck.parquet"
    path.parent.mkdir(parents=True)
    stuck.to_parquet(path)
    raw = root / params.data.path
    before = len(pd.read_csv(raw))

    @flow
    def append(accept: bool) -> dict:
        return add_training_data(root, params, Window([str(path)], ["x"], 100), "check-1", accept)

    out = append(False)
    assert out["rows_held_back"] == "10" and out["rows_added"] == "90", out
    assert "far outside the training range" in out["held_back"] and "pixel_3_4 = 38.8" in out["held_back"]
    held = pd.read_parquet(out["held_back.path"])
    assert len(held) == 10 and held["holdback.reason"].str.contains("pixel_3_4").all()
    assert len(pd.read_csv(raw)) == before + 90 and pd.read_csv(raw)["pixel_3_4"].max() <= 16
    out = append(True)  # accepted explicitly (--accept-drifted): every row goes in
    assert out["rows_added"] == "100" and out["rows_held_back"].startswith("0")
