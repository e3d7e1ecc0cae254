"""A nightly run on nothing new does nothing: the pipeline under a Prefect test harness, on its own MLflow store and
DVC remote, run again and again on one project. Same data, code and params as the champion: nothing trained (a
drift check's retrain without new labelled rows included); a params change trains and must beat the champion by
gate.min_gain; force trains anyway (and is held to it too); new data is not held to gate.min_gain."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from flows.drift import drift_check
from flows.pipeline import training_pipeline
from flows.score import batch_scoring
from ottimo import vocab
from ottimo.cli.main import app
from ottimo.config import load_params
from ottimo.data import versioning
from ottimo.monitor import simulate
from ottimo.registry import runkey, versions
from ottimo.registry.tracking import connect
from tests.conftest import write_project

SETTINGS = {
    "train": {"candidates": ["mlp"], "max_epochs": 6},
    "card": {"importance_rows": 50, "importance_repeats": 1, "batch_sizes": [1, 64], "seconds_per_batch_size": 0.05},
    "gate": {"min_accuracy": 0.5, "max_drop_vs_champion": 100.0, "min_gain": 0.5},  # a new data revision passes
    "drift": {"min_rows": 60},
}


def pipeline_runs(client, exp: str) -> list:
    return client.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.PIPELINE}'", order_by=["start_time DESC"])


def children(client, exp: str, run_id: str) -> list:
    return client.search_runs([exp], f"tags.`{vocab.PARENT}` = '{run_id}'")


def state_of(client, name: str) -> tuple[dict, dict]:
    """aliases, and {version: tags} of every version."""
    return versions.aliases(client, name), {str(v.version): dict(v.tags) for v in
                                            client.search_model_versions(f"name = '{name}'")}


def test_nothing_new_skips_then_min_gain_force_and_new_data(tmp_path, prefect_harness):
    project = write_project(tmp_path / "project", SETTINGS)
    params = load_params(project / "params.yaml")
    name = params.mlflow.registered_model

    # 1. the first run promotes v1; its key is on the pipeline run and on the version
    first = training_pipeline(project_dir=str(project), return_state=True)
    assert first.is_completed(), first.message
    assert first.result().skipped is False
    client, exp = connect(project, params.mlflow)
    aliases, registered = state_of(client, name)
    assert aliases["champion"] == "1" and list(registered) == ["1"]
    key = runkey.key_of(params, versioning.revision(project))
    v1 = registered["1"]
    assert {k: v1[k] for k in key.tags()} == key.tags()
    assert {k: client.get_run(first.result().run_id).data.tags[k] for k in key.tags()} == key.tags()

    # 2. again on the same project: nothing new, nothing trained, and the run says so
    second = training_pipeline(project_dir=str(project), return_state=True)
    assert second.is_completed(), second.message
    summary = second.result()
    assert summary.skipped and summary.candidates == [] and summary.champion == "1"
    assert summary.message.startswith(f"nothing new since champion v1: same data revision {key.data_revision[:8]}, "
                                      "code and params; nothing trained. Pass force=true")
    assert state_of(client, name) == (aliases, registered)  # no version, no alias moved, no tag changed
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[vocab.SKIPPED] == summary.message
    assert "skipped, nothing new (v1)" in run.info.run_name and run.data.tags[vocab.NOTE].startswith("**SKIPPED")
    assert run.data.tags[vocab.PARAMS_FINGERPRINT] == key.params and children(client, exp, summary.run_id) == []

    # a drift check on an unlabelled, drifted batch decides to retrain; no labelled row is added, so the data
    # revision is the champion's: its retrain is skipped too, and the check says so
    test = pd.read_parquet(project / "data" / "prepared" / "test.parquet")
    features = [c for c in test.columns if c != params.data.target]
    simulate.write(simulate.batches(test, features, params.data.target, "shift", 1.0, 1, 80, seed=3, labels=False),
                   project / params.score.incoming, "drifted")
    assert batch_scoring(project_dir=str(project), return_state=True).is_completed()
    check = drift_check(project_dir=str(project), return_state=True)
    assert check.is_completed(), check.message
    assert check.result().action == "retrain", check.result().reasons
    assert check.result().outcome["training"] == "skipped" and "nothing new" in check.result().outcome["message"]
    assert versioning.revision(project) == key.data_revision and state_of(client, name) == (aliases, registered)
    assert vocab.SKIPPED in pipeline_runs(client, exp)[0].data.tags

    # 3. a params change that makes another model (a flow-run override): trained, and on the champion's data it
    # must beat it by gate.min_gain; it does not, so the run fails and the champion aliases stay as they were
    third = training_pipeline(project_dir=str(project), max_epochs=2, return_state=True)
    assert third.is_failed()
    assert "gate.min_gain" in third.message and "the champion stays" in third.message, third.message
    aliases3, registered3 = state_of(client, name)
    assert aliases3["champion"] == "1" and "previous-champion" not in aliases3
    assert registered3["1"] == registered["1"]
    v2 = registered3["2"]
    assert vocab.tag(v2, vocab.GATE_VERDICT) == vocab.FAILED and "gate.min_gain" in vocab.tag(v2, vocab.GATE_REASONS)
    assert v2[vocab.PARAMS_FINGERPRINT] != key.params and v2[vocab.CODE_FINGERPRINT] == key.code
    assert v2[vocab.DATA_REVISION] == key.data_revision

    # 4. nothing new again, and `ottimo run --force`: trained anyway, the same model again, refused by min_gain
    cli = CliRunner().invoke(app, ["run", "-C", str(project), "--force"])
    assert cli.exit_code == 1, cli.output
    out = " ".join(cli.output.split())
    assert "gate failed" in out and "gate.min_gain" in out and "gain vs champion 0.00 points" in out, out
    forced = pipeline_runs(client, exp)[0]
    assert vocab.SKIPPED not in forced.data.tags and len(children(client, exp, forced.info.run_id)) == 1
    aliases4, registered4 = state_of(client, name)
    assert aliases4["champion"] == "1" and vocab.tag(registered4["3"], vocab.GATE_VERDICT) == vocab.FAILED
    assert registered4["3"][vocab.PARAMS_FINGERPRINT] == key.params  # the key was the champion's: forced

    # 5. new rows in the training data: a new data revision, not held to gate.min_gain (max_drop_vs_champion is)
    raw = project / params.data.path
    df = pd.read_csv(raw)
    pd.concat([df, df.sample(60, random_state=0)], ignore_index=True).to_csv(raw, index=False)
    fifth = training_pipeline(project_dir=str(project), return_state=True)
    assert fifth.is_completed(), fifth.message
    assert fifth.result().data_revision != key.data_revision
    aliases5, registered5 = state_of(client, name)
    assert aliases5["champion"] == "4" and aliases5["previous-champion"] == "1"
    assert "gate.min_gain does not apply" in vocab.tag(registered5["4"], vocab.GATE_REASONS)
