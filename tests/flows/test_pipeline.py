"""System tests: the whole training flow under a Prefect test harness, on its own MLflow store and DVC remote."""

import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.pipeline import training_pipeline
from ottimo import vocab
from ottimo.cli.main import app
from ottimo.config import load_params
from ottimo.data import versioning
from ottimo.data.tables import load_splits
from ottimo.onnx.export import sha256
from ottimo.onnx.measure import predict, session
from ottimo.registry import versions
from ottimo.registry.tracking import connect


def run(project: Path):
    return training_pipeline(project_dir=str(project), return_state=True)


def registry_state(client: MlflowClient, name: str) -> tuple[dict, list]:
    found = client.search_model_versions(f"name = '{name}'")
    return versions.aliases(client, name), sorted((str(v.version), dict(v.tags)) for v in found)


def test_pipeline_promotes_then_compares_then_gate_failure_changes_nothing(project, prefect_harness, tmp_path):
    params = load_params(project / "params.yaml")
    name = params.mlflow.registered_model

    # 1. first run: data versioned, every candidate registered, the best one is champion
    first = run(project)
    assert first.is_completed(), first.message
    summary = first.result()
    client, exp = connect(project, params.mlflow)
    aliases, registered = registry_state(client, name)
    assert len(registered) == 2
    assert set(aliases) == {"champion", "challenger"} and aliases["champion"] == aliases["challenger"]
    assert summary.prepared is True and summary.data_revision == versioning.revision(project)
    for _, tags in registered:
        assert vocab.tag(tags, vocab.DATA_REVISION) == summary.data_revision
        assert vocab.tag(tags, vocab.GATE_VERDICT) in {"passed", "failed"} and len(tags["sha256"]) == 64
        assert client.get_run(tags["run_id"]).data.tags["mlflow.parentRunId"] == summary.run_id
    parent = client.get_run(summary.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["gate.verdict"] == "passed"
    assert parent.data.tags[vocab.FLOW_RUN] == str(first.state_details.flow_run_id)
    assert parent.inputs.dataset_inputs[0].dataset.digest == summary.data_revision[:12]
    # the run says what it decided: name, the gated candidate's figures and the verdict as metrics, a description
    assert parent.info.run_name.endswith(f"→ v{aliases['champion']} PASS"), parent.info.run_name
    assert parent.data.metrics[vocab.GATE_PASSED] == 1.0 and "test_accuracy" in parent.data.metrics
    assert parent.data.tags[vocab.NOTE].startswith("**PASS")
    assert client.get_experiment(exp).tags[vocab.EXPERIMENT_KIND] == vocab.CLASSIC_ML
    models = client.search_logged_models([exp])  # in the run's experiment, named after the family
    assert sorted(m.name for m in models) == sorted(params.train.candidates)
    assert (project / ".dvc-remote" / "files" / "md5").is_dir()
    assert versioning.status_cloud(project) == {}  # raw and prepared data are all in the remote

    # the champion's ONNX file, downloaded from models:/<name>@champion and verified, reproduces its test accuracy
    path, mv = versions.download_verified(client, name, "champion", tmp_path / "champion")
    assert sha256(path) == mv.tags["sha256"]
    assert [p.name for p in (tmp_path / "champion").rglob("*")] == [path.name]  # the ONNX file only
    splits = load_splits(project / "data" / "prepared")
    accuracy = float((predict(session(path), splits.X_test) == splits.y_test).mean())
    logged = client.get_run(mv.run_id).data.metrics["test_accuracy"]
    assert accuracy == logged
    # every metric is stamped when it was logged (MLflow's UI charts them against wall time): epochs and test figures
    started, now = client.get_run(mv.run_id).info.start_time, time.time() * 1000
    for key in ("val_accuracy", "best_epoch", "test_accuracy"):
        stamps = [m.timestamp for m in client.get_metric_history(mv.run_id, key)]
        assert stamps and all(started <= t <= now for t in stamps), (key, stamps, started)
    assert "confusion_matrix.png" in [a.path for a in client.list_artifacts(mv.run_id)]
    status = CliRunner().invoke(app, ["status", "--project-dir", str(project)])
    assert status.exit_code == 0
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in status.output.splitlines()
            if line.startswith("│")}  # first column: the champion
    assert rows["version"] == str(mv.version) and rows["accuracy"] == f"{logged:.4f}", status.output
    assert rows["gate"] == "passed" and rows["data revision"] == summary.data_revision[:12], status.output

    # 2. second run on unchanged data with a gate that lets a retrain trail the champion by a point (a params
    # change, so the run is not skipped as nothing new): prepare skipped, candidates compared with the champion
    relaxed = yaml.safe_load((project / "params.yaml").read_text())
    relaxed["gate"]["min_gain"] = -1.0
    (project / "params.yaml").write_text(yaml.safe_dump(relaxed))
    second = run(project)
    assert second.is_completed(), second.message
    assert second.result().prepared is False
    aliases2, versions2 = registry_state(client, name)
    assert len(versions2) == 4
    assert aliases2["previous-champion"] == aliases["champion"]
    assert int(aliases2["champion"]) > int(aliases["champion"])
    new = dict(versions2)[aliases2["champion"]]
    reasons = vocab.tag(new, vocab.GATE_REASONS)
    assert "vs champion" in reasons and "same data revision; min gain -1.00" in reasons
    assert "no champion yet" not in reasons

    # 3. a gate nobody can pass: the flow run fails with the reasons; champion aliases stay as they were
    strict = yaml.safe_load((project / "params.yaml").read_text())
    strict["gate"]["max_p95_latency_ms"] = 0.0001
    (project / "params.yaml").write_text(yaml.safe_dump(strict))
    third = run(project)
    assert third.is_failed()
    assert "gate failed" in third.message and "p95 latency" in third.message
    aliases3, versions3 = registry_state(client, name)
    assert aliases3["champion"] == aliases2["champion"]
    assert aliases3["previous-champion"] == aliases2["previous-champion"]
    assert all(vocab.tag(tags, vocab.GATE_VERDICT) == "failed" for v, tags in versions3 if int(v) > 4)
    failed_parent = client.search_runs([exp], "tags.`ottimo.kind` = 'pipeline'", order_by=["start_time DESC"])[0]
    assert failed_parent.info.status == "FAILED"
    assert "p95 latency" in failed_parent.data.tags["gate.reasons"]
    # a failed run still gets its summary: the verdict as a metric, a name and a description with every candidate
    assert failed_parent.data.metrics[vocab.GATE_PASSED] == 0.0 and "test_p95_ms" in failed_parent.data.metrics
    assert failed_parent.info.run_name.endswith(" FAIL") and "**FAIL" in failed_parent.data.tags[vocab.NOTE]
    assert all(f"| {family} |" in failed_parent.data.tags[vocab.NOTE] for family in params.train.candidates)


def test_bad_raw_data_stops_before_anything_is_trained(project, prefect_harness):
    params = load_params(project / "params.yaml")
    from ottimo.data.tables import builtin_frame

    df = builtin_frame("digits")
    df.loc[[3, 8], "pixel_4_4"] = np.nan
    raw = project / params.data.path
    raw.parent.mkdir(parents=True)
    df.to_csv(raw, index=False)

    state = run(project)
    assert state.is_failed()
    assert "'pixel_4_4'" in state.message and "rows [3, 8]" in state.message
    client, exp = connect(project, params.mlflow)
    assert client.search_runs([exp]) == []
    assert client.search_registered_models() == []
    assert not (project / "data" / "prepared").exists()
    assert pd.read_csv(raw).shape == df.shape  # the user's file is left as it was


def test_parity_failure_fails_the_flow_and_closes_its_mlflow_runs(tmp_path, prefect_harness):
    from tests.conftest import write_project

    # the transformer's attention and layer norms round differently in onnxruntime than in torch (~1e-6); the MLP's
    # Gemm can match torch bit for bit
    overrides = {"evaluate": {"parity_atol": 1e-12}, "train": {"candidates": ["transformer"]}}
    project = write_project(tmp_path / "project", overrides)
    params = load_params(project / "params.yaml")
    state = run(project)
    assert state.is_failed() and "ONNX logits differ from PyTorch" in state.message
    client, exp = connect(project, params.mlflow)
    runs = client.search_runs([exp])
    assert {r.data.tags["ottimo.kind"] for r in runs} == {"pipeline", "candidate"}
    assert all(r.info.status == "FAILED" and "ONNX logits differ" in r.data.tags["failure"] for r in runs)
    assert client.search_registered_models() == []
