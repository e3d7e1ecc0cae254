"""Your own data with text class labels, through the real flows: the pipeline trains on "bird" / "cat" / "dog", the
class list is fixed in schema.json, MLflow, the ONNX file and the card; scoring, serving and late labels speak the
same labels, and a label the model does not know is refused and quarantined, never taken for a new class. Also what
`ottimo run` prints when the data is refused: every bracketed value, and where the details really are."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification
from typer.testing import CliRunner

from ottimo import vocab
from ottimo.cli.main import app
from ottimo.config import load_params
from ottimo.onnx.metadata import read_classes
from ottimo.registry import versions
from ottimo.registry.tracking import connect
from tests.conftest import seeded_harness, write_project

CLASSES = ["bird", "cat", "dog"]
TARGET = "species"
FAST_CARD = {"slices": [], "image_shape": None, "importance_rows": 20, "importance_repeats": 1, "batch_sizes": [1, 8],
             "seconds_per_batch_size": 0.05, "severities": [0.0, 0.2], "drift_kinds": ["shift"],
             "drift_severities": [0.1]}


@pytest.fixture(scope="module")
def harness(prefect_db):
    with seeded_harness(prefect_db, timeout=90):
        yield


def animals(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Six numeric features and three well separated text classes (seeded)."""
    X, y = make_classification(n_samples=n, n_features=6, n_informative=4, n_redundant=0, n_classes=3,
                               n_clusters_per_class=1, class_sep=3.0, random_state=seed)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(6)])
    df[TARGET] = np.array(["dog", "bird", "cat"])[y]  # class order of the file is not the sorted order
    return df


def text_project(tmp: Path) -> Path:
    root = write_project(tmp / "project", {
        "data": {"path": "data/raw/animals.csv", "builtin": None, "target": TARGET},
        "train": {"candidates": ["mlp"], "max_epochs": 15}, "gate": {"min_accuracy": 0.6}, "card": FAST_CARD,
        "drift": {"min_rows": 1000}})  # late labels only: the check stays "insufficient data"
    (root / "data" / "raw").mkdir(parents=True)
    animals().to_csv(root / "data" / "raw" / "animals.csv", index=False)
    return root


def test_text_labels_train_score_serve_and_refuse_an_unknown_label(tmp_path, harness):
    from flows.drift import drift_check
    from flows.pipeline import training_pipeline
    from flows.score import batch_scoring

    root = text_project(tmp_path)
    params = load_params(root / "params.yaml")
    state = training_pipeline(project_dir=str(root), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()

    # the class list of this data revision, sorted, everywhere it is recorded
    schema = json.loads((root / "data" / "prepared" / "schema.json").read_text())
    assert schema["labels"] == CLASSES
    client, _ = connect(root, params.mlflow)
    assert json.loads(client.get_run(summary.run_id).data.tags[vocab.CLASSES]) == CLASSES
    name = params.mlflow.registered_model
    path, mv = versions.download_verified(client, name, versions.CHAMPION, tmp_path / "champion")
    assert read_classes(path) == CLASSES and json.loads(mv.tags[vocab.CLASSES]) == CLASSES  # sha256 verified
    card = json.loads(Path(client.download_artifacts(mv.run_id, "card/card.json", str(tmp_path))).read_text())
    assert card["deployment"]["classes"] == CLASSES == card["deployment"]["classes_in_file"]
    assert {c["label"] for c in card["accuracy"]["per_class"]} == set(CLASSES)

    # a batch without labels and one with them: predictions carry the text labels
    incoming = root / params.score.incoming
    incoming.mkdir(parents=True)
    fresh = animals().sample(60, random_state=1).reset_index(drop=True)
    fresh.drop(columns=[TARGET]).to_csv(incoming / "a-unlabelled.csv", index=False)
    fresh.to_csv(incoming / "b-labelled.csv", index=False)
    scored = batch_scoring(project_dir=str(root), return_state=True)
    assert scored.is_completed(), scored.message
    for batch in ("a-unlabelled", "b-labelled"):
        pred = pd.read_parquet(incoming / f"{batch}.predictions.parquet")["prediction"]
        assert set(pred) <= set(CLASSES) and len(pred) == 60 and (pred == fresh[TARGET]).mean() > 0.6

    # a labelled batch with a class the model does not know: refused naming it, moved to quarantine with its reason
    aliases = versions.aliases(client, name)
    wolf = fresh.head(20).copy()
    wolf.loc[[4, 11], TARGET] = "wolf"
    wolf.to_csv(incoming / "c-wolf.csv", index=False)
    content = (incoming / "c-wolf.csv").read_bytes()
    cli = CliRunner().invoke(app, ["score", "-C", str(root)])
    assert cli.exit_code == 1
    out = " ".join(cli.output.split())
    assert "unknown label(s) ['wolf'] at rows [4, 11]" in out and "['bird', 'cat', 'dog']" in out, out
    assert not (incoming / "c-wolf.csv").exists() and not (incoming / "c-wolf.predictions.parquet").exists()
    quarantine = root / params.limits.quarantine_dir
    kept = [p for p in quarantine.glob("c-wolf.csv.*") if not p.name.endswith(".reason.txt")]
    assert len(kept) == 1 and kept[0].read_bytes() == content  # nothing lost
    assert "['wolf']" in next(quarantine.glob("c-wolf.csv.*.reason.txt")).read_text()
    assert versions.aliases(client, name) == aliases

    # the endpoint answers and takes labels as text; an unknown label is a 422 naming it, nothing recorded
    with warnings.catch_warnings():  # starlette's hint to use httpx2: not this test's business
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from ottimo.serving.app import Endpoint
    from ottimo.serving.model import Follower
    from ottimo.serving.traffic import TrafficLog

    follower = Follower(root, params)
    with TestClient(Endpoint(root, params, follower, TrafficLog(root, params)).app()) as http:
        rows = fresh.head(3)[[f"f{i}" for i in range(6)]].to_dict("records")
        answer = http.post("/predict", json={"rows": rows}).json()
        assert answer["classes"] == CLASSES and set(answer["labels"]) <= set(CLASSES), answer
        bad = http.post("/labels", json={"id": answer["id"], "labels": ["cat", "wolf", "dog"]})
        assert bad.status_code == 422 and "['wolf'] at positions [1]" in bad.json()["error"], bad.json()
        good = http.post("/labels", json={"id": answer["id"], "labels": fresh[TARGET].head(3).tolist()})
        assert good.status_code == 202, good.json()
        http.post("/traffic/flush")
    served = [p for p in (root / params.deploy.serve.traffic_dir).glob("serve-*.parquet")
              if not p.name.endswith(".predictions.parquet")]
    assert len(served) == 1 and pd.read_parquet(served[0])[TARGET].tolist() == fresh[TARGET].head(3).tolist()

    # late labels: a file naming the known classes counts; one with an unknown class is quarantined, named
    labels = incoming / "labels"
    labels.mkdir()
    pd.DataFrame({"batch": "a-unlabelled.csv", "row": range(10), TARGET: fresh[TARGET].head(10)}).to_csv(
        labels / "day-1.csv", index=False)
    pd.DataFrame({"batch": "a-unlabelled.csv", "row": [0, 1], TARGET: ["cat", "wolf"]}).to_csv(
        labels / "day-2.csv", index=False)
    check = drift_check(project_dir=str(root), return_state=True)
    assert check.is_failed() and "late labels day-2.csv" in check.message and "['wolf']" in check.message
    assert (labels / "done" / "day-1.csv").is_file() and not (labels / "day-2.csv").exists()
    assert len(list(quarantine.glob("day-2.csv.*.reason.txt"))) == 1
    assert versions.aliases(client, name) == aliases


def test_run_prints_bracketed_values_and_where_the_details_are(tmp_path, harness):
    """Rich markup would swallow `[nan]`; and a data error happens before any MLflow run exists."""
    root = text_project(tmp_path)
    raw = root / "data" / "raw" / "animals.csv"
    df = pd.read_csv(raw)
    df.loc[[3, 8], "f2"] = np.nan
    df.to_csv(raw, index=False)
    cli = CliRunner().invoke(app, ["run", "-C", str(root)])
    assert cli.exit_code == 1
    out = " ".join(cli.output.split())
    assert "column 'f2' fails not_nullable at rows [3, 8] (values [nan, nan])" in out, out
    assert "before any MLflow run was opened" in out and ".reason.txt" in out and "MLflow run (tags" not in out
    params = load_params(root / "params.yaml")
    client, exp = connect(root, params.mlflow)
    assert client.search_runs([exp]) == []
