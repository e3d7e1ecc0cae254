"""System test of the production loop: real Prefect flows, real Evidently, real MLflow registry, real DVC.

train → a batch too small (insufficient data) → a clean batch (nothing) → a drifted labelled batch (retrain:
new data revision, new champion) → a batch on which the new champion is worse than the old (rollback) →
a malformed batch (quarantined, nothing else changes) → a tampered sha256 (nothing is loaded) → the manual
promote and rollback flows → `ottimo status`.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from flows.drift import drift_check
from flows.manage import promote
from flows.manage import rollback as manual_rollback
from flows.pipeline import training_pipeline
from flows.score import batch_scoring
from ottimo import vocab
from ottimo.cli.main import app
from ottimo.config import load_params
from ottimo.data import batches, versioning
from ottimo.data.tables import builtin_frame
from ottimo.monitor import ledger, simulate
from ottimo.onnx.measure import predict, session
from ottimo.registry import versions
from ottimo.registry.tracking import connect
from tests.conftest import write_project

OVERRIDES = {
    "train": {"candidates": ["mlp"], "max_epochs": 4},
    "card": {"importance_rows": 50, "importance_repeats": 1, "batch_sizes": [1, 64], "seconds_per_batch_size": 0.05},
    "gate": {"min_accuracy": 0.5, "max_drop_vs_champion": 100.0},  # the retrained model is always promoted
    "drift": {"min_rows": 60, "rollback_margin": 2.0},
}


def score_and_check(project: Path):
    scored = batch_scoring(project_dir=str(project), return_state=True)
    assert scored.is_completed(), scored.message
    state = drift_check(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def registry_state(client, name):
    return versions.aliases(client, name), sorted(
        (v.version, v.tags.get("sha256")) for v in client.search_model_versions(f"name = '{name}'"))


def test_production_loop(tmp_path, prefect_harness):
    project = write_project(tmp_path / "project", OVERRIDES)
    params = load_params(project / "params.yaml")
    name, incoming = params.mlflow.registered_model, project / "data" / "incoming"

    # train: v1 is champion
    assert training_pipeline(project_dir=str(project), return_state=True).is_completed()
    client, _ = connect(project, params.mlflow)
    v1 = versions.aliases(client, name)["champion"]
    rev1 = versioning.revision(project)
    schema = batches.schema_of(project / "data" / "prepared")
    features = schema["features"]
    test = pd.read_parquet(project / "data" / "prepared" / "test.parquet")

    # no previous-champion yet: a rollback changes nothing and says why
    state = manual_rollback(reason="too early", project_dir=str(project), return_state=True)
    assert state.is_failed() and "no previous-champion" in state.message
    assert versions.aliases(client, name) == {"champion": v1, "challenger": v1}

    # a batch below drift.min_rows: scored, but the check decides nothing ("insufficient data") and keeps it
    simulate.write(simulate.batches(test, features, "target", "none", 0, 1, 30, seed=1), incoming, "a-small")
    check = score_and_check(project)
    assert check.action == "insufficient data" and check.evidence["rows"] == 30
    preds = pd.read_parquet(incoming / "a-small-000.predictions.parquet")
    assert len(preds) == 30 and set(preds["model_version"]) == {v1}

    # a clean labelled batch: window of 150 rows (the small batch waited), nothing to do
    simulate.write(simulate.batches(test, features, "target", "none", 0, 1, 120, seed=2), incoming, "b-clean")
    check = score_and_check(project)
    assert check.action == "nothing", check.reasons
    assert check.evidence["rows"] == 150 and not check.evidence["dataset_drift"]
    assert check.evidence["accuracy"] > 0.8 and check.evidence["previous_accuracy"] is None
    mclient, mexp = ledger.connect_monitoring(project, params)
    run = ledger.last_check(mclient, mexp)
    assert run.data.tags["decision"] == "nothing"
    assert {a.path for a in mclient.list_artifacts(run.info.run_id)} >= {
        "drift_report.html", "quality_report.html", "summary.json"}
    assert "drift_share" in run.data.metrics and ledger.unchecked(mclient, mexp) == []

    # a drifted labelled batch (every pixel brighter by one std): retrain on the data plus the batch
    raw_rows = len(pd.read_csv(project / params.data.path))
    simulate.write(simulate.batches(test, features, "target", "shift", 1.0, 1, 200, seed=3), incoming, "c-drift")
    check = score_and_check(project)
    assert check.action == "retrain", check.reasons
    assert check.evidence["dataset_drift"] and check.evidence["drift_share"] >= params.drift.drift_share
    assert "pixel_3_3" in check.evidence["drifted"]  # per-column tests of the DataDriftPreset
    rev2 = versioning.revision(project)
    assert rev2 != rev1 and check.outcome["data_revision"] == rev2 and check.outcome["rows_added"] == "200"
    assert len(pd.read_csv(project / params.data.path)) == raw_rows + 200
    aliases = versions.aliases(client, name)
    v2 = aliases["champion"]
    assert int(v2) > int(v1) and aliases["previous-champion"] == v1 and check.outcome["champion"] == v2
    assert vocab.tag(versions.version(client, name, v2).tags, vocab.DATA_REVISION) == rev2

    # a labelled window on which v2 is worse than v1: rows of the digits data (and a noisy copy) that v1
    # classifies right and v2 wrong, topped up with rows both get right; built from the models' own predictions
    pool = builtin_frame("digits")
    pool = pd.concat([pool, simulate.shift(pool, features, "target", "noise", 0.5, seed=4)], ignore_index=True)
    X, y = pool[features].to_numpy(dtype="float32"), pool["target"].to_numpy()
    right = {v: predict(session(versions.download_verified(client, name, v, tmp_path / f"v{v}")[0]), X) == y
             for v in (v1, v2)}
    worse = np.flatnonzero(right[v1] & ~right[v2])
    both = np.flatnonzero(right[v1] & right[v2])
    assert len(worse) >= 4, f"only {len(worse)} rows where v1 beats v2: the test cannot build its window"
    rows = np.concatenate([worse[:20], both[: 80 - min(len(worse), 20)]])
    simulate.write([pool.iloc[rows].reset_index(drop=True)], incoming, "d-regress")
    check = score_and_check(project)
    assert check.action == "rollback", check.reasons
    assert check.evidence["previous_accuracy"] - check.evidence["accuracy"] > 0.02
    aliases = versions.aliases(client, name)
    assert aliases["champion"] == v1 and aliases["previous-champion"] == v2
    assert "replaced by v" + v1 in versions.version(client, name, v2).tags["rolled_back"]
    assert "restored over v" + v2 in versions.version(client, name, v1).tags["restored"]

    # a malformed batch (missing values) next to a good one: quarantined with a reason, the run fails naming it;
    # the good batch is scored; registry, data and the earlier predictions are untouched
    before = registry_state(client, name), versioning.revision(project), sorted(p.name for p in incoming.iterdir())
    simulate.write(simulate.batches(test, features, "target", "missing", 0.1, 1, 50, seed=5), incoming, "e-bad")
    simulate.write(simulate.batches(test, features, "target", "none", 0, 1, 20, seed=6, labels=False),
                   incoming, "f-good")
    state = batch_scoring(project_dir=str(project), return_state=True)
    assert state.is_failed() and "e-bad-000.parquet" in state.message and "not_nullable" in state.message
    [note] = (project / "data" / "quarantine").glob("e-bad-000.parquet.*.reason.txt")
    assert note.with_name(note.name.removesuffix(".reason.txt")).is_file()
    assert not (incoming / "e-bad-000.parquet").exists() and "schema violation" in note.read_text()
    assert (incoming / "f-good-000.predictions.parquet").is_file()
    after = registry_state(client, name), versioning.revision(project), sorted(
        p.name for p in incoming.iterdir() if not p.name.startswith("f-good"))
    assert after == before

    # a champion whose ONNX file does not match its sha256 tag is never loaded: nothing is scored
    sha1 = versions.version(client, name, v1).tags["sha256"]
    client.set_model_version_tag(name, v1, "sha256", "0" * 64)
    simulate.write(simulate.batches(test, features, "target", "none", 0, 1, 20, seed=7), incoming, "g-later")
    state = batch_scoring(project_dir=str(project), return_state=True)
    assert state.is_failed() and "does not match" in state.message
    assert not (incoming / "g-later-000.predictions.parquet").exists()

    client.set_model_version_tag(name, v1, "sha256", sha1)

    # manual flows: promote v2 back through the gate (it passes this test's gate), then roll back by hand
    assert promote(version=v2, force=True, project_dir=str(project), return_state=True).is_failed()  # no reason
    assert promote(version=v2, project_dir=str(project), return_state=True).is_completed()
    assert versions.aliases(client, name)["champion"] == v2
    assert "gate passed" in versions.version(client, name, v2).tags["promoted_manually"]
    assert manual_rollback(reason="by hand", project_dir=str(project), return_state=True).is_completed()
    assert versions.aliases(client, name)["champion"] == v1

    # `ottimo status` shows the last check and its decision
    out = CliRunner().invoke(app, ["status", "--project-dir", str(project)])
    assert out.exit_code == 0 and "Last drift check" in out.output and "rollback" in out.output, out.output
