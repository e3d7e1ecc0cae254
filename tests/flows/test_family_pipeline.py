"""Model families through the whole pipeline: a family that only this test knows (its module in the test's project),
the built-in CNN on digits as images, and the transformer on the generated token sequences."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import onnx
import pandas as pd
import pytest
import yaml

from flows.drift import drift_check
from flows.pipeline import training_pipeline
from flows.score import batch_scoring
from ottimo import vocab
from ottimo.config import load_params
from ottimo.registry import versions
from ottimo.registry.tracking import connect
from tests.conftest import REPO, write_project

PIXELNET = '''"""A team's own model: one conv layer, pooled to 2x2, and a linear head."""
from torch import nn

from ottimo import InputSpec


def build(spec: InputSpec, n_classes: int, channels: int = 8, dropout: float = 0.0) -> nn.Module:
    if spec.kind != "image":
        raise ValueError("pixelnet takes images")
    return nn.Sequential(nn.Conv2d(spec.shape[0], channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * 4, n_classes))
'''

QUICK = {  # small but real: compression of the teacher alone, one variant per technique
    "compress": {"enabled": True, "bases": ["teacher"], "distill": {"enabled": False},
                 "prune": {"unstructured": [], "structured": [0.5], "finetune_epochs": 3},
                 "quantize": {"options": ["int8-dyn"], "after_structured": False},
                 "select": {"max_drop_vs_teacher": 30.0, "min_accuracy": 0.5}},
    "gate": {"min_accuracy": 0.5},
    "card": {"importance_rows": 50, "importance_repeats": 1, "batch_sizes": [1, 64], "seconds_per_batch_size": 0.05},
    "drift": {"min_rows": 60},
}
IMAGE = {"data": {"input": {"kind": "image", "shape": [1, 8, 8]}}}


def runs_by_name(client, exp: str, parent: str) -> dict:
    found = client.search_runs([exp], f"tags.`{vocab.ROOT_FLOW_RUN}` != ''", max_results=500)
    return {r.data.tags.get(vocab.RUN_NAME): r for r in found if r.data.tags.get(vocab.PARENT) == parent}


def champion_input(client, name: str) -> list:
    mv = versions.alias_version(client, name, versions.CHAMPION)
    path = mlflow.artifacts.download_artifacts(f"models:/{name}@{versions.CHAMPION}")
    model = onnx.load(str(next(Path(path).rglob("*.onnx"))))
    return mv, [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def assert_structured_pruning_shrinks(client, exp: str, parent: str, family: str, at_most: float = 0.8) -> None:
    runs = runs_by_name(client, exp, parent)
    dense, pruned = runs[f"{family} trained"].data.metrics, runs[f"{family}+prune-s50"].data.metrics
    assert pruned["parameters"] < at_most * dense["parameters"], (pruned["parameters"], dense["parameters"])
    assert pruned["test_size_mb"] < dense["test_size_mb"]


def test_a_family_only_this_test_knows_goes_through_the_whole_loop(tmp_path, prefect_harness):
    project = write_project(tmp_path / "project", {**QUICK, **IMAGE, "families": {"pixelnet": {
        "builder": "pixelnets.pixel:build", "hparams": {"channels": 8}, "train": {"lr": 0.01},
        "space": {"channels": [4, 8], "lr": {"low": 0.003, "high": 0.03, "log": True}}, "trial_epochs": 3}},
        "train": {"candidates": ["pixelnet"], "max_epochs": 8},
        "tune": {"enabled": True, "n_trials": 2},
        "compress": {**QUICK["compress"], "teacher": "pixelnet"}})
    (project / "pixelnets").mkdir()
    (project / "pixelnets" / "pixel.py").write_text(PIXELNET)
    hits = subprocess.run(["grep", "-rl", "pixelnet", "ottimo", "tasks", "flows"], cwd=REPO, capture_output=True)
    assert hits.returncode == 1, hits.stdout  # Ottimo's code does not know it

    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    params = load_params(project / "params.yaml")
    client, exp = connect(project, params.mlflow)
    summary = state.result()
    runs = runs_by_name(client, exp, summary.run_id)
    assert {"tune-pixelnet", "pixelnet trained (tuned)", "pixelnet+prune-s50", "pixelnet+int8-dyn"} <= set(runs)
    mv, dims = champion_input(client, params.mlflow.registered_model)
    assert dims[1:] == [1, 8, 8]  # the champion takes the family's input shape
    assert mv.tags[vocab.FAMILY_RUN] == "pixelnet"  # whichever candidate won (trained or compressed), its network

    incoming = project / "data" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    test = pd.read_parquet(project / "data" / "prepared" / "test.parquet")
    test.head(80).drop(columns="target").to_csv(incoming / "batch-1.csv", index=False)
    scored = batch_scoring(project_dir=str(project), return_state=True)
    assert scored.is_completed(), scored.message
    preds = pd.read_parquet(incoming / "batch-1.predictions.parquet")
    assert len(preds) == 80 and (preds["prediction"].astype(str) == test.head(80)["target"].astype(str)).mean() > 0.5
    check = drift_check(project_dir=str(project), return_state=True)
    assert check.is_completed(), check.message
    assert check.result().evidence["rows"] == 80


@pytest.mark.slow  # the whole loop once more on another family: in `make test-slow`, which CI runs
def test_the_cnn_on_digits_as_images_reaches_a_champion_and_prunes_structurally(tmp_path, prefect_harness):
    project = write_project(tmp_path / "project", {**QUICK, **IMAGE, "train": {"candidates": ["cnn"]},
                                                   "families": {"cnn": {"hparams": {"channels": [8, 16]}}},
                                                   "compress": {**QUICK["compress"], "teacher": "cnn"}})
    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    params = load_params(project / "params.yaml")
    client, exp = connect(project, params.mlflow)
    mv, dims = champion_input(client, params.mlflow.registered_model)
    assert dims[1:] == [1, 8, 8] and mv.tags[vocab.FAMILY].startswith("cnn")  # trained or compressed
    assert mv.tags[vocab.FAMILY_RUN] == "cnn"
    assert client.get_run(mv.run_id).data.metrics.get("test_accuracy", 1.0) >= 0.9
    assert_structured_pruning_shrinks(client, exp, state.result().run_id, "cnn")


LINEAR = '''from torch import nn


def build(spec, n_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(spec.size, n_classes))  # nothing between input and classes
'''


SEQUENCES = {"path": "data/raw/sequences.npz", "builtin": "sequences", "sequences": {"rows": 1200},
             "input": {"kind": "sequence", "shape": [24], "vocab_size": 120}}


def test_the_transformer_on_generated_sequences_reaches_a_champion_and_prunes_structurally(tmp_path,
                                                                                          prefect_harness):
    student = {"student": "transformer", "epochs": 4, "hparams": {"d_model": 16, "heads": 2, "layers": 1,
                                                                  "ff_dim": 16}}
    project = write_project(tmp_path / "project", {**QUICK, "data": SEQUENCES, "train": {
        "candidates": ["transformer"], "max_epochs": 6}, "compress": {
        **QUICK["compress"], "teacher": "transformer", "bases": ["teacher", "student"], "distill": {
            "enabled": True, **student}}})
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["compress"]["distill"]["hparams"] = student["hparams"]  # replace params.yaml's mlp student hparams, not merge
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    params = load_params(project / "params.yaml")
    client, exp = connect(project, params.mlflow)
    mv, dims = champion_input(client, params.mlflow.registered_model)
    assert dims[1:] == [24]
    runs = runs_by_name(client, exp, state.result().run_id)
    assert runs["student-transformer"].data.tags[vocab.FAMILY_RUN] == "transformer"  # a smaller transformer
    assert runs["transformer trained"].data.metrics["test_accuracy"] >= 0.75  # 4 classes: chance is 0.25
    # the token embedding (vocab x d_model) and the attention projections stay whole: the feed-forward neurons go
    assert_structured_pruning_shrinks(client, exp, state.result().run_id, "transformer", at_most=0.95)


def test_a_model_structured_pruning_cannot_shrink_is_skipped_with_the_reason(tmp_path, prefect_harness):
    compress = {**QUICK["compress"], "teacher": "linear",
                "quantize": {"options": ["int8-dyn"], "after_structured": True}}
    project = write_project(tmp_path / "project", {**QUICK, "families": {"linear": {"builder": "linear:build"}},
                                                   "train": {"candidates": ["linear"], "max_epochs": 5},
                                                   "compress": compress, "gate": {"min_accuracy": 0.3}})
    (project / "linear.py").write_text(LINEAR)
    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    client, exp = connect(project, load_params(project / "params.yaml").mlflow)
    parent = state.result().run_id
    runs = runs_by_name(client, exp, parent)
    reason = runs["linear+prune-s50"].data.tags["compress.skipped"]
    assert "no channel or neuron can be removed" in reason
    assert "was skipped" in runs["linear+prune-s50+int8-dyn"].data.tags["compress.skipped"]
    report = mlflow.artifacts.load_text(f"runs:/{parent}/compression/report.md")
    assert "skipped: no channel or neuron can be removed" in report
    assert client.get_run(parent).data.tags["compress.selected"] in {"linear", "linear+int8-dyn"}
