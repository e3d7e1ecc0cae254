"""Evaluation tasks: export a candidate to ONNX (with parity check) and measure it in onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task

from ottimo import vocab
from ottimo.config import Params
from ottimo.data import labels
from ottimo.data.tables import load_splits
from ottimo.models.family import rebuild
from ottimo.onnx.export import export_onnx, parity_check
from ottimo.onnx.measure import accuracy, confusion_png, measure
from ottimo.registry import security, versions
from ottimo.registry.logged_model import log_onnx_model
from ottimo.registry.tracking import connect, stamped, work_dir
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
    model_family: str = ""  # the family its network is (a compressed candidate's name says more); "": `family`
    onnx_path: str = ""  # its local ONNX file (sha256 as above), e.g. to time it against the champion


@task(task_run_name="export_candidate[{cand.family}]")
def export_candidate(root: Path, params: Params, cand: Candidate, data: DataVersion) -> Exported:
    """Export to ONNX with a dynamic batch axis, check parity on the test split, log it as an MLflow ONNX model."""
    client, _ = connect(root, params.mlflow)
    model = rebuild(cand.recipe, cand.spec, cand.n_classes, cand.checkpoint)
    path = export_onnx(model, cand.spec, work_dir(root, cand.run_id) / versions.ONNX_FILE)
    X_test = load_splits(Path(data.prepared)).X_test
    diff = parity_check(model, path, X_test, params.evaluate.parity_atol)
    model_uri, digest = log_onnx_model(client, cand.run_id, path, X_test, cand.family, {
        vocab.FAMILY_RUN: cand.family, vocab.TECHNIQUE: "trained", vocab.DATA_REVISION: data.revision},
        classes=labels.of_prepared(data.prepared))
    client.log_metric(cand.run_id, "parity_max_abs_diff", diff)
    get_run_logger().info("%s exported to ONNX (%.1f kB), parity max |diff| %.1e", cand.family,
                          path.stat().st_size / 1e3, diff)
    return Exported(cand.family, cand.run_id, str(path), digest, model_uri, diff)


@task(task_run_name="evaluate_candidate[{cand.family}]")
def evaluate_candidate(root: Path, params: Params, cand: Candidate, exp: Exported, data: DataVersion) -> Evaluated:
    """Accuracy, macro-F1, confusion matrix, p50/p95 latency at batch 1, throughput, size: all to MLflow."""
    client, _ = connect(root, params.mlflow)
    splits = load_splits(Path(data.prepared))
    metrics, pred = measure(Path(exp.onnx_path), splits.X_test, splits.y_test, params.evaluate)
    client.log_batch(cand.run_id, metrics=stamped({f"test_{k}": v for k, v in metrics.as_dict().items()}))
    png = confusion_png(splits.y_test, pred, splits.labels, work_dir(root, cand.run_id) / "confusion_matrix.png",
                        f"{cand.family}: test accuracy {metrics.accuracy:.4f}")
    client.log_artifact(cand.run_id, str(png))
    get_run_logger().info("%s: acc %.4f f1 %.4f p50 %.3f ms p95 %.3f ms %.0f rows/s %.3f MB", cand.family,
                          metrics.accuracy, metrics.macro_f1, metrics.p50_ms, metrics.p95_ms,
                          metrics.throughput_rps, metrics.size_mb)
    return Evaluated(cand.family, cand.run_id, exp.model_uri, exp.sha256, cand.parameters, metrics.as_dict(),
                     onnx_path=exp.onnx_path)


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
    acc = accuracy(path, splits.X_test, splits.y_test)
    get_run_logger().info("champion v%s: accuracy %.4f on this test split", mv.version, acc)
    return acc
