"""Evaluation tasks: export a candidate to ONNX (with parity check) and measure it in onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import onnx
import torch
from mlflow.entities import Metric
from mlflow.models import infer_signature
from prefect import get_run_logger, task

from ottimo import vocab
from ottimo.config import Params
from ottimo.data.tables import load_splits
from ottimo.models.architectures import build_model
from ottimo.onnx.export import export_onnx, parity_check, sha256
from ottimo.onnx.measure import confusion_png, measure, predict, session
from ottimo.registry import security, versions
from ottimo.registry.tracking import connect, new_logged_model, work_dir
from tasks.data import DataVersion
from tasks.retry import RETRY_TRANSIENT
from tasks.train import Candidate


@dataclass(frozen=True)
class Exported:
    family: str
    run_id: str
    onnx_path: str
    sha256: str
    model_uri: str  # MLflow logged-model URI, what the registry version points at
    parity_max_abs_diff: float


@dataclass(frozen=True)
class Evaluated:
    family: str
    run_id: str
    model_uri: str
    sha256: str
    parameters: int
    metrics: dict[str, float]  # accuracy, macro_f1, p50_ms, p95_ms, throughput_rps, size_mb


@task
def export_candidate(root: Path, params: Params, cand: Candidate, data: DataVersion) -> Exported:
    """Export to ONNX with a dynamic batch axis, check parity on the test split, log it as an MLflow ONNX model."""
    client, _ = connect(root, params.mlflow)
    model_id = new_logged_model(client, cand.run_id, cand.family, {vocab.FAMILY_RUN: cand.family,
                                                                   vocab.TECHNIQUE: "trained",
                                                                   vocab.DATA_REVISION: data.revision})
    model = build_model(cand.family, cand.n_features, cand.n_classes, params.train.patched(cand.overrides))
    model.load_state_dict(torch.load(cand.checkpoint, weights_only=True))
    path = export_onnx(model, cand.n_features, work_dir(root, cand.run_id) / versions.ONNX_FILE)
    X_test = load_splits(Path(data.prepared)).X_test
    diff = parity_check(model, path, X_test, params.evaluate.parity_atol)
    digest = sha256(path)
    example = X_test[:2]
    info = mlflow.onnx.log_model(
        onnx.load(str(path)), name=vocab.model_name(cand.family), model_id=model_id, run_id=cand.run_id,
        save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
        signature=infer_signature(example, session(path).run(None, {"features": example})[0]),
        input_example=example,
    )
    client.log_metric(cand.run_id, "parity_max_abs_diff", diff)
    client.set_tag(cand.run_id, "onnx.sha256", digest)
    get_run_logger().info("%s exported to ONNX (%.1f kB), parity max |diff| %.1e", cand.family,
                          path.stat().st_size / 1e3, diff)
    return Exported(cand.family, cand.run_id, str(path), digest, info.model_uri, diff)


@task
def evaluate_candidate(root: Path, params: Params, cand: Candidate, exp: Exported, data: DataVersion) -> Evaluated:
    """Accuracy, macro-F1, confusion matrix, p50/p95 latency at batch 1, throughput, size: all to MLflow."""
    client, _ = connect(root, params.mlflow)
    splits = load_splits(Path(data.prepared))
    metrics, pred = measure(Path(exp.onnx_path), splits.X_test, splits.y_test, params.evaluate)
    client.log_batch(cand.run_id, metrics=[Metric(f"test_{k}", v, 0, 0) for k, v in metrics.as_dict().items()])
    png = confusion_png(splits.y_test, pred, splits.labels, work_dir(root, cand.run_id) / "confusion_matrix.png",
                        f"{cand.family}: test accuracy {metrics.accuracy:.4f}")
    client.log_artifact(cand.run_id, str(png))
    get_run_logger().info("%s: acc %.4f f1 %.4f p50 %.3f ms p95 %.3f ms %.0f rows/s %.3f MB", cand.family,
                          metrics.accuracy, metrics.macro_f1, metrics.p50_ms, metrics.p95_ms,
                          metrics.throughput_rps, metrics.size_mb)
    return Evaluated(cand.family, cand.run_id, exp.model_uri, exp.sha256, cand.parameters, metrics.as_dict())


@task(**RETRY_TRANSIENT)  # reads only
def evaluate_champion(root: Path, params: Params, data: DataVersion) -> float | None:
    """The champion's accuracy on this run's test split (its ONNX file verified by sha256), or None."""
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    if versions.alias_version(client, name, versions.CHAMPION) is None:
        get_run_logger().info("no champion yet: the gate will not compare against one")
        return None
    path, mv = security.fetch_verified(client, name, versions.CHAMPION, work_dir(root, "champion"))
    splits = load_splits(Path(data.prepared))
    acc = float((predict(session(path), splits.X_test) == splits.y_test).mean())
    get_run_logger().info("champion v%s: accuracy %.4f on this test split", mv.version, acc)
    return acc
