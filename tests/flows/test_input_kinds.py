"""System test of a token-sequence project through the loop: the `sequences` builtin as an .npz data file, a
transformer champion, .npz and column batches scored, batches of the wrong length or with unknown token ids
quarantined, and a drifted labelled window (longer sequences of other tokens) detected on summary features and
appended to the .npz training data (its rows still int token ids; rows far outside the training summaries held
back) before the retrain."""


import numpy as np
import pandas as pd
import pytest

from flows.drift import drift_check
from flows.pipeline import training_pipeline
from flows.score import batch_scoring
from ottimo.config import DataCfg, load_params
from ottimo.data import batches, sequences
from ottimo.registry import versions
from ottimo.registry.tracking import connect
from tests.conftest import write_project

DATA = {"path": "data/raw/sequences.npz", "builtin": "sequences", "input": {"kind": "sequence", "shape": [24],
                                                                           "vocab_size": 120},
        "sequences": {"rows": 1200}}
OVERRIDES = {
    "data": DATA,
    "train": {"candidates": ["transformer"], "max_epochs": 6},
    "card": {"importance_rows": 50, "importance_repeats": 1, "batch_sizes": [1, 16], "seconds_per_batch_size": 0.05},
    "gate": {"min_accuracy": 0.6, "max_drop_vs_champion": 100.0},
    "drift": {"min_rows": 60},
}


def rows_of(seed: int, n: int, **sequences_cfg) -> pd.DataFrame:
    """Rows of the builtin task drawn with another seed (other background and marker tokens) or settings."""
    cfg = DataCfg.model_validate(DATA | {"seed": seed, "sequences": DATA["sequences"] | sequences_cfg})
    return sequences.frame(cfg).iloc[:n]


@pytest.mark.slow  # about 40 s; the default suite trains and promotes on sequences in test_family_pipeline
def test_a_sequence_project_through_the_loop(tmp_path, prefect_harness):
    project = write_project(tmp_path / "project", OVERRIDES)
    params = load_params(project / "params.yaml")
    incoming = project / params.score.incoming
    raw = project / DATA["path"]

    assert training_pipeline(project_dir=str(project), return_state=True).is_completed()
    client, _ = connect(project, params.mlflow)
    v1 = versions.aliases(client, params.mlflow.registered_model)["champion"]
    schema = batches.schema_of(project / "data" / "prepared")
    assert schema["input"] == {"kind": "sequence", "shape": [24], "dtype": "int64", "vocab_size": 120, "pad_id": 0}
    with np.load(raw) as z:
        assert z["X"].shape == (1200, 24) and z["X"].dtype == np.int64

    same = rows_of(42, 80)  # the training distribution (data.seed 42)
    incoming.mkdir(parents=True, exist_ok=True)
    np.savez(incoming / "a-ids.npz", X=same.drop(columns="target").to_numpy())
    same.iloc[:20].drop(columns="target").to_csv(incoming / "b-columns.csv", index=False)
    oov = same.drop(columns="target").to_numpy().copy()
    oov[3, 5] = 500
    np.savez(incoming / "c-oov.npz", X=oov)
    np.savez(incoming / "d-short.npz", X=oov[:, :20])
    state = batch_scoring(project_dir=str(project), return_state=True)
    assert state.is_failed()
    assert "c-oov.npz: column 'token_5' row 3 holds 500, which is outside the model's vocabulary" in state.message
    assert "d-short.npz" in state.message and "rows of shape [20]; the model takes sequence rows of shape [24]" \
        in state.message
    quarantine = project / params.limits.quarantine_dir
    assert {p.name.split(".")[0] for p in quarantine.glob("*.reason.txt")} == {"c-oov", "d-short"}
    for name, n in (("a-ids", 80), ("b-columns", 20)):
        preds = pd.read_parquet(incoming / f"{name}.predictions.parquet")
        assert len(preds) == n and set(preds["model_version"]) == {v1}
    accuracy = (pd.read_parquet(incoming / "a-ids.predictions.parquet")["prediction"] == same["target"]).mean()
    assert accuracy > 0.6

    # the window so far is the training distribution: nothing to do
    state = drift_check(project_dir=str(project), return_state=True)
    assert state.is_completed() and state.result().action == "nothing", state.result().reasons
    assert state.result().evidence["columns"] == 13  # length, 10 common tokens, rare and unseen shares

    # a labelled window of longer sequences with other tokens: drift on the summaries, rows added, retrain
    drifted = rows_of(9, 150, min_length=20)
    np.savez(incoming / "e-drift.npz", X=drifted.drop(columns="target").to_numpy(), y=drifted["target"].to_numpy())
    assert batch_scoring(project_dir=str(project), return_state=True).is_completed()
    state = drift_check(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    check = state.result()
    assert check.action == "retrain", check.reasons
    assert check.evidence["dataset_drift"] and "length" in check.evidence["drifted"]
    added, held = int(check.outcome["rows_added"]), int(check.outcome.get("rows_held_back", "0"))
    assert added + held == 150 and added >= 140  # a few rows of mostly rare tokens may be held back (summaries)
    with np.load(raw) as z:
        assert z["X"].shape == (1200 + added, 24) and z["X"].dtype == np.int64
        window = {tuple(r) for r in drifted.drop(columns="target").to_numpy()}
        assert all(tuple(r) in window for r in z["X"][1200:])  # the window's rows, as int token ids
    assert versions.aliases(client, params.mlflow.registered_model)["champion"] != v1
