"""Accuracy-aware quantization: the loop Intel Neural Compressor and NNCF run, on ONNX files.

Quantize; if accuracy drops more than `tolerance` points below the FP32 file's, rank the weight-carrying nodes the
option quantizes by how much keeping each one alone in FP32 recovers, then keep the most harmful in FP32
(`nodes_to_exclude`), `step` more per round, re-measuring each round, until the drop is within tolerance or the
budget (`max_excluded` nodes, `max_rounds` rounds) is spent.

The ranking (method "exclude-one"): with every candidate quantized, the squared error of the logits against the
FP32 file's on the evaluation rows is E_all; with every candidate but node n quantized it is E_n. n's sensitivity is
E_all - E_n, what keeping n in FP32 recovers. Logit error, not accuracy, ranks: it is continuous, so a few hundred
rows order the nodes where accuracy would tie; both are recorded. Ties go to graph order. It costs one quantization
and one evaluation per candidate, once (static options calibrate once: the ranges are cached across rounds).
Everything is deterministic: dynamic quantization has no randomness, static calibration reads the same rows in the
same order.

Evaluate on a validation split, not the test split the report quotes: the loop chooses on what it measures.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ottimo.compress.quantize import QuantOption, preprocess, quantize, weight_nodes
from ottimo.onnx.measure import scores, session


@dataclass(frozen=True)
class NodeSensitivity:
    """One candidate node: what keeping it alone in FP32 recovers (logit MSE, all-INT8 minus this-node-FP32) and the
    accuracy with it kept in FP32."""

    node: str
    op_type: str
    recovered_mse: float
    accuracy_if_fp32: float

    @property
    def why(self) -> str:
        return (f"{self.op_type} {self.node}: kept in FP32 it recovers {self.recovered_mse:.3g} of the logit MSE "
                f"(accuracy {self.accuracy_if_fp32:.4f})")


@dataclass(frozen=True)
class Round:
    """One measurement: the nodes kept in FP32 and what the quantized file scored."""

    excluded: tuple[str, ...]
    accuracy: float
    drop_points: float  # (FP32 accuracy - this accuracy) x 100
    logit_mse: float


@dataclass(frozen=True)
class AccuracyAwareResult:
    """The outcome: the final file (None when it failed), the nodes kept in FP32 with their measured sensitivity,
    every round, and why it ended."""

    option: str
    path: str | None
    success: bool
    reason: str
    fp32_accuracy: float
    tolerance_points: float
    rounds: tuple[Round, ...]
    excluded: tuple[NodeSensitivity, ...]  # in the order they were kept in FP32, most harmful first
    ranking: tuple[NodeSensitivity, ...] = ()  # every candidate, most harmful first (empty: no ranking needed)

    @property
    def accuracy(self) -> float:
        return self.rounds[-1].accuracy

    def as_dict(self) -> dict:
        """Every field (rounds and nodes as dicts) plus `summary`, JSON-ready (for MLflow and the report)."""
        return asdict(self) | {"summary": self.summary}

    @property
    def summary(self) -> str:
        kept = ", ".join(s.node for s in self.excluded) or "none"
        return (f"{self.option}: {'within' if self.success else 'NOT within'} {self.tolerance_points:.2f} points "
                f"after {len(self.rounds)} round(s) ({self.reason}); FP32 nodes: {kept}")


class _Evaluator:
    """Accuracy and logit MSE of a file against the FP32 logits on fixed rows."""

    def __init__(self, fp32: Path, X: np.ndarray, y: np.ndarray):
        self.X, self.y = X, np.asarray(y)
        self.ref = scores(session(fp32), X)
        self.fp32_accuracy = float((self.ref.argmax(axis=1) == self.y).mean())

    def __call__(self, path: Path) -> tuple[float, float]:
        got = scores(session(path), self.X)
        return float((got.argmax(axis=1) == self.y).mean()), float(((got - self.ref) ** 2).mean())


def rank_nodes(pre: Path, option: QuantOption, calib_rows: np.ndarray | None, evaluate: _Evaluator, work: Path,
               all_mse: float) -> list[NodeSensitivity]:
    """Every candidate node of the pre-processed file `pre`, most harmful first (exclude-one; see the module)."""
    out = []
    for i, (node, op) in enumerate(weight_nodes(pre, option)):
        acc, mse = evaluate(quantize(pre, work / f"rank{i}.onnx", option, calib_rows, [node], pre_process=False,
                                     calibration_cache=work / "calibration.json"))
        out.append((-(all_mse - mse), i, NodeSensitivity(node, op, all_mse - mse, acc)))
    return [s for *_, s in sorted(out, key=lambda t: (t[0], t[1]))]


def accuracy_aware(src: Path, dst: Path, option: QuantOption, calib_rows: np.ndarray | None, X_eval: np.ndarray,
                   y_eval: np.ndarray, tolerance_points: float, *, max_excluded: int = 8, max_rounds: int = 8,
                   step: int = 1, skip_symbolic_shape: bool = True) -> AccuracyAwareResult:
    """Quantize FP32 `src` into `dst` as `option` says, keeping in FP32 the fewest most-sensitive nodes that bring
    accuracy on (X_eval, y_eval) to within `tolerance_points` (accuracy points, 0-100 scale) of src's.

    Round 0 quantizes everything; each further round keeps `step` more nodes (by rank) in FP32, up to `max_excluded`
    nodes and `max_rounds` rounds after round 0. On failure `dst` holds nothing new and the result says why (budget
    spent, or no node left to keep)."""
    work = Path(tempfile.mkdtemp(prefix="ottimo-aaq-"))
    try:
        return _loop(Path(src), Path(dst), option, calib_rows, _Evaluator(Path(src), X_eval, y_eval),
                     tolerance_points, max_excluded, max_rounds, max(1, step), skip_symbolic_shape, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _loop(src: Path, dst: Path, option: QuantOption, calib_rows, evaluate: _Evaluator, tol: float,
          max_excluded: int, max_rounds: int, step: int, skip_symbolic_shape: bool, work: Path) -> AccuracyAwareResult:
    pre = preprocess(src, work / "pre.onnx", skip_symbolic_shape)
    fp32 = evaluate.fp32_accuracy

    def measure(excluded: tuple[str, ...]) -> tuple[Path, Round]:
        path = quantize(pre, work / f"round{len(rounds)}.onnx", option, calib_rows, excluded, pre_process=False,
                        calibration_cache=work / "calibration.json")
        acc, mse = evaluate(path)
        return path, Round(excluded, acc, (fp32 - acc) * 100, mse)

    def done(path: Path, ok: bool, reason: str, kept=(), ranking=()) -> AccuracyAwareResult:
        final = None
        if ok:
            shutil.copyfile(path, dst)
            final = str(dst)
        return AccuracyAwareResult(option.name, final, ok, reason, fp32, tol, tuple(rounds), tuple(kept),
                                   tuple(ranking))

    rounds: list[Round] = []
    path, first = measure(())
    rounds.append(first)
    if first.drop_points <= tol + 1e-9:
        return done(path, True, f"plain {option.name} is within tolerance ({first.drop_points:.2f} points)")
    ranking = rank_nodes(pre, option, calib_rows, evaluate, work, first.logit_mse)
    limit = min(max_excluded, len(ranking))
    if limit == 0:
        why = "no quantizable node to keep in FP32" if not ranking else "max_excluded is 0"
        return done(path, False, f"{why}; plain {option.name} drops {first.drop_points:.2f} points", (), ranking)
    k = 0
    while len(rounds) <= max_rounds and k < limit:
        k = min(k + step, limit)
        path, r = measure(tuple(s.node for s in ranking[:k]))
        rounds.append(r)
        if r.drop_points <= tol + 1e-9:
            return done(path, True, f"{k} node(s) in FP32 bring the drop to {r.drop_points:.2f} points",
                        ranking[:k], ranking)
    spent = (f"max_excluded {max_excluded} reached" if k >= max_excluded else
             f"all {len(ranking)} candidate nodes kept in FP32" if k >= len(ranking) else
             f"max_rounds {max_rounds} reached")
    return done(path, False, f"{spent}: still {rounds[-1].drop_points:.2f} points below FP32 (tolerance {tol:.2f}); "
                "raise the budget or the tolerance, or try another option", ranking[:k], ranking)
