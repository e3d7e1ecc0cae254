"""Measure an ONNX model in onnxruntime: accuracy, macro-F1, latency percentiles, throughput, size."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from matplotlib.figure import Figure  # the object API needs no backend or pyplot state
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, f1_score

from ottimo.config import EvaluateCfg
from ottimo.onnx.export import INPUT, OUTPUT, shaped


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    macro_f1: float
    p50_ms: float
    p95_ms: float
    throughput_rps: float
    size_mb: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def scores(sess: ort.InferenceSession, X: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The model's raw class scores (logits or probabilities), one row per input row."""
    X = shaped(sess, X)
    return np.concatenate([sess.run([OUTPUT], {INPUT: X[i : i + batch]})[0] for i in range(0, len(X), batch)])


def predict(sess: ort.InferenceSession, X: np.ndarray, batch: int = 1024) -> np.ndarray:
    return scores(sess, X, batch).argmax(axis=1)


def accuracy(model: Path | ort.InferenceSession, X: np.ndarray, y: np.ndarray) -> float:
    """The share of rows of X an ONNX file (opened with `session`) or an open session labels as y does."""
    sess = model if isinstance(model, ort.InferenceSession) else session(Path(model))
    return float((predict(sess, X) == y).mean())


def latency_ms(sess: ort.InferenceSession, X: np.ndarray, warmup: int, runs: int) -> tuple[float, float]:
    """p50 and p95 wall time of single-row inference, cycling through rows of X."""
    X = shaped(sess, X)
    rows = [X[i % len(X)][None] for i in range(warmup + runs)]
    times = []
    for i, row in enumerate(rows):
        t0 = time.perf_counter_ns()
        sess.run([OUTPUT], {INPUT: row})
        if i >= warmup:
            times.append(time.perf_counter_ns() - t0)
    p50, p95 = np.percentile(times, [50, 95]) / 1e6
    return float(p50), float(p95)


def throughput_rps(sess: ort.InferenceSession, X: np.ndarray, batch: int, runs: int = 50) -> float:
    """Rows per second at a fixed batch size (rows repeated to fill the batch)."""
    X = shaped(sess, X)
    xb = X[np.arange(batch) % len(X)]
    for _ in range(5):
        sess.run([OUTPUT], {INPUT: xb})
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run([OUTPUT], {INPUT: xb})
    return batch * runs / (time.perf_counter() - t0)


def measure(path: Path, X: np.ndarray, y: np.ndarray, cfg: EvaluateCfg, latency: bool = True
            ) -> tuple[Metrics, np.ndarray]:
    """All figures of one ONNX file on a labelled split; returns them and the predictions. `latency` False: p50/p95
    are NaN (the caller times several files interleaved, ottimo.onnx.latency.figures)."""
    sess = session(path, cfg.threads)
    pred = predict(sess, X)
    p50, p95 = latency_ms(sess, X, cfg.warmup, cfg.runs) if latency else (float("nan"), float("nan"))
    metrics = Metrics(
        accuracy=float(accuracy_score(y, pred)),
        macro_f1=float(f1_score(y, pred, average="macro")),
        p50_ms=p50,
        p95_ms=p95,
        throughput_rps=throughput_rps(sess, X, cfg.throughput_batch),
        size_mb=path.stat().st_size / 1e6,
    )
    return metrics, pred


def confusion_png(y: np.ndarray, pred: np.ndarray, labels: list[int], path: Path, title: str) -> Path:
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        y, pred, labels=range(len(labels)), display_labels=labels, ax=ax, colorbar=False
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
