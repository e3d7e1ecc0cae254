"""Model cards: the eight dimensions a team weighs before deploying, measured from an ONNX file and the data.

Pure functions: an ONNX path, the prepared splits and `CardCfg` in; a `ModelCard` (JSON-ready sections), PNG
plots and markdown out. Nothing here talks to MLflow or Prefect (ottimo.card.store does), so the card of any old
version can be recomputed from its registered ONNX file and its data revision.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import get_args

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
from matplotlib.figure import Figure
from scipy import ndimage
from sklearn.inspection import permutation_importance
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from ottimo.config import CardCfg, CardFigure, EvaluateCfg, SliceCfg
from ottimo.data.tables import Splits
from ottimo.monitor import simulate
from ottimo.onnx import latency
from ottimo.onnx.export import INPUT, OUTPUT, shaped
from ottimo.onnx.measure import accuracy, confusion_png, latency_ms, predict, session
from ottimo.onnx.metadata import read_classes
from ottimo.spec import InputSpec

SECTIONS = {
    "accuracy": "1. Accuracy",
    "robustness": "2. Robustness",
    "generalisation": "3. Generalisation",
    "fairness": "4. Bias and fairness",
    "interpretability": "5. Interpretability",
    "lineage": "6. Compliance and lineage",
    "scalability": "7. Scalability and cost",
    "deployment": "8. Deployment readiness",
}
# Every scalar figure (`section.key`, the names `gate.card` accepts) and which way is better (None: descriptive).
FIGURES: dict[str, str | None] = {
    "accuracy.accuracy": "higher", "accuracy.macro_f1": "higher",
    "robustness.noise": "higher", "robustness.scale": "higher", "robustness.missing": "higher",
    "robustness.shift": "higher", "robustness.rotate": "higher",  # images
    "robustness.dropout": "higher", "robustness.substitute": "higher",  # token sequences
    "generalisation.train_test_gap": "lower", "generalisation.train_val_gap": "lower",
    "generalisation.drift_accuracy": "higher",
    "fairness.recall_spread": "lower", "fairness.min_class_recall": "higher", "fairness.slice_gap": "lower",
    "interpretability.top5_share": None,
    "scalability.p50_ms": "lower", "scalability.p95_ms": "lower", "scalability.max_throughput_rps": "higher",
    "scalability.cpu_s_per_million": "lower", "scalability.cost_per_million": "lower",
    "deployment.size_mb": "lower", "deployment.peak_memory_mb": "lower", "deployment.single_thread_ok": "higher",
    "deployment.opset": None,
}
assert set(FIGURES) == set(get_args(CardFigure)), "ottimo.config.CardFigure and card.FIGURES must name the same"
# Timings and memory change from run to run; everything else is recomputed exactly from the file and the data.
VOLATILE = {"computed_at": None, "scalability": None, "deployment": (
    "peak_memory_mb", "peak_rss_mb", "memory_method", "single_thread_ok", "single_thread_p95_ms")}
KINDS = ("noise", "scale", "missing")  # tabular rows' perturbations
INPUT_KINDS = {"tabular": KINDS, "image": ("shift", "rotate"), "sequence": ("dropout", "substitute")}
METHODS = {
    "noise": "Gaussian noise, standard deviation = severity x the feature's train standard deviation",
    "scale": "every feature multiplied by one factor drawn from U(1 - severity, 1 + severity)",
    "missing": "each value missing with probability = severity, imputed as the feature's train mean",
    "shift": "each image translated by severity x half its size, in a random direction per image (bilinear, edges "
             "repeated)",
    "rotate": "each image turned by severity x 90 degrees, clockwise or counter-clockwise at random (bilinear, "
              "edges repeated)",
    "dropout": "each token replaced by the padding id with probability = severity",
    "substitute": "each token replaced by a random id of the vocabulary (not the padding id) with probability = "
                  "severity",
}
MAX_DISTINCT = 20  # a slice column with bins: null may have at most this many values


@dataclass(frozen=True)
class ModelCard:
    accuracy: dict
    robustness: dict
    generalisation: dict
    fairness: dict
    interpretability: dict
    scalability: dict
    deployment: dict
    lineage: dict = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)  # PNG files written next to card.json
    computed_at: str = ""

    def figures(self) -> dict[str, float]:
        """The flat scalar figures a gate may bound; NaN where nothing could be measured."""
        out = {}
        for name in FIGURES:
            section, key = name.split(".")
            value = getattr(self, section).get(key)
            out[name] = math.nan if value is None else float(value)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def deterministic(card: ModelCard | dict) -> dict:
    """The card without its timings and memory figures: what a recomputation must reproduce exactly."""
    d = json.loads(json.dumps(card.to_dict() if isinstance(card, ModelCard) else card))
    for key, sub in VOLATILE.items():
        if sub is None:
            d.pop(key, None)
        else:
            d[key] = {k: v for k, v in d.get(key, {}).items() if k not in sub}
    return d


def _num(x: float) -> float | None:
    """A JSON-safe float: NaN becomes None."""
    x = float(x)
    return None if math.isnan(x) else x


# --- 1. accuracy -------------------------------------------------------------------------------------------------

def accuracy_section(y: np.ndarray, pred: np.ndarray, labels: list[int]) -> dict:
    k = range(len(labels))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=list(k), zero_division=0)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=list(k), average="macro", zero_division=0)),
        "rows": len(y),
        "per_class": [{"label": labels[i], "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(s[i])} for i in k],
        "confusion_matrix": confusion_matrix(y, pred, labels=list(k)).tolist(),  # rows: true, columns: predicted
    }


# --- 2. robustness -----------------------------------------------------------------------------------------------

def draw(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The random numbers behind one perturbation kind, drawn once and reused at every severity (common random
    numbers: the curve then moves with the severity, not with a fresh draw)."""
    if kind == "noise":
        return rng.standard_normal(shape)
    if kind == "scale":
        return rng.uniform(-1, 1, shape[1])
    if kind == "missing":
        return rng.random(shape)
    raise ValueError(f"unknown perturbation {kind!r}; use one of {KINDS}")


def perturb(X: np.ndarray, kind: str, severity: float, base: np.ndarray, mean: np.ndarray,
            std: np.ndarray) -> np.ndarray:
    """noise: + N(0, (severity * train std)^2) per feature; scale: each feature times one factor from
    U(1 - severity, 1 + severity); missing: each value lost with probability `severity`, imputed as the train mean."""
    if kind == "noise":
        out = X + base * (severity * std)
    elif kind == "scale":
        out = X * (1 + severity * base)
    elif kind == "missing":
        out = np.where(base < severity, mean, X)
    else:
        raise ValueError(f"unknown perturbation {kind!r}; use one of {KINDS}")
    return out.astype(np.float32)


def draw_input(kind: str, n: int, spec: InputSpec, rng: np.random.Generator) -> np.ndarray:
    """The random numbers behind an image or sequence perturbation (common random numbers, as `draw`): per image a
    direction (shift) or a sign (rotate); per token a uniform and a substitute id (pad_id never drawn)."""
    if kind == "shift":
        return rng.uniform(0, 2 * np.pi, n)
    if kind == "rotate":
        return rng.choice([-1.0, 1.0], n)
    if kind in ("dropout", "substitute"):
        ids = rng.integers(0, max(int(spec.vocab_size or 2) - 1, 1), (n, spec.size))
        ids = ids + (ids >= int(spec.pad_id or 0))  # skip the padding id
        return np.stack([rng.random((n, spec.size)), ids])
    raise ValueError(f"unknown perturbation {kind!r} for {spec.kind} rows; use one of {INPUT_KINDS[spec.kind]}")


def perturb_input(X: np.ndarray, kind: str, severity: float, base: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Flat image or sequence rows perturbed as METHODS[kind] says, still flat (float32)."""
    if kind in ("shift", "rotate"):
        imgs = X.reshape(len(X), *spec.shape).astype("float64")
        if severity == 0:
            return X.astype(np.float32)
        half = severity * max(spec.shape[1:]) / 2
        out = [ndimage.shift(im, (0, half * np.sin(b), half * np.cos(b)), order=1, mode="nearest")
               if kind == "shift" else
               ndimage.rotate(im, b * severity * 90, axes=(2, 1), reshape=False, order=1, mode="nearest")
               for im, b in zip(imgs, base, strict=True)]
        return np.stack(out).reshape(len(X), -1).astype(np.float32)
    pad = float(spec.pad_id or 0)
    hit = (base[0] < severity) & (X != pad)
    out = np.where(hit, pad if kind == "dropout" else base[1], X)
    return out.astype(np.float32)


def robustness_section(sess: ort.InferenceSession, X: np.ndarray, y: np.ndarray, X_train: np.ndarray,
                       cfg: CardCfg, spec: InputSpec | None = None) -> dict:
    """Test accuracy under each perturbation of the input kind (INPUT_KINDS) at each severity (seeded per kind)."""
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    kinds = INPUT_KINDS[spec.kind if spec else "tabular"]
    curves = {}
    for i, kind in enumerate(kinds):
        rng = np.random.default_rng([cfg.seed, i])
        if kind in KINDS:
            base = draw(kind, X.shape, rng)
            curves[kind] = [accuracy(sess, perturb(X, kind, s, base, mean, std), y) for s in cfg.severities]
        else:
            base = draw_input(kind, len(X), spec, rng)
            curves[kind] = [accuracy(sess, perturb_input(X, kind, s, base, spec), y) for s in cfg.severities]
    return {
        "severities": list(cfg.severities),
        "curves": curves,
        # headline per kind: mean accuracy over the non-zero severities (area under the curve)
        **{kind: float(np.mean(curve[1:])) for kind, curve in curves.items()},
        "method": {kind: METHODS[kind] for kind in kinds},
        "seed": cfg.seed,
    }


# --- 3. generalisation -------------------------------------------------------------------------------------------

IMAGE_SHIFTS = ("rotate", "blur")  # simulator kinds that need image rows (data.input) or card.image_shape


def image_shape(cfg: CardCfg, spec: InputSpec | None, n_features: int) -> list[int] | None:
    """The image the features form: data.input's for image rows ([H, W] for one channel, else [C, H, W]); none for
    token sequences; card.image_shape for tabular rows when it matches the feature count."""
    if spec is not None and spec.kind == "image":
        c, h, w = spec.shape
        return [h, w] if c == 1 else [c, h, w]
    if spec is not None and spec.kind == "sequence":
        return None
    return list(cfg.image_shape) if cfg.image_shape and math.prod(cfg.image_shape) == n_features else None


def drift_accuracy(sess: ort.InferenceSession, X: np.ndarray, y: np.ndarray, features: list[str],
                   cfg: CardCfg, spec: InputSpec | None = None) -> dict:
    """Test accuracy under the drift simulator's mild covariate shifts (ottimo.monitor.simulate.shift: each kind
    in card.drift_kinds at each severity in card.drift_severities, seeded by card.seed and the kind): the curves,
    their mean, and the kinds left out (image kinds without an image; every kind for token sequences, whose ids
    the simulator's numeric shifts would turn into other tokens)."""
    shape = image_shape(cfg, spec, len(features))
    numeric = spec is None or spec.kind != "sequence"
    kinds = [k for k in cfg.drift_kinds if numeric and (shape or k not in IMAGE_SHIFTS)]
    frame = pd.DataFrame(X, columns=features)
    curves = {}
    for i, kind in enumerate(kinds):
        curves[kind] = [accuracy(sess, simulate.shift(frame, features, None, kind, sev, cfg.seed + i,
                                                      image_shape=shape)[features].to_numpy(np.float32), y)
                        for sev in cfg.drift_severities]
    mean = float(np.mean([a for c in curves.values() for a in c])) if curves else None
    return {"drift_accuracy": mean, "drift_severities": list(cfg.drift_severities), "drift_curves": curves,
            "drift_skipped": [k for k in cfg.drift_kinds if k not in kinds], "drift_seed": cfg.seed}


def generalisation_section(sess: ort.InferenceSession, splits: Splits, cfg: CardCfg | None = None) -> dict:
    """Accuracy per split, the gaps between them, and test accuracy under mild simulated drift (seeded, so a
    recomputation from the same file and data gives the same figures)."""
    acc = {name: accuracy(sess, getattr(splits, f"X_{name}"), getattr(splits, f"y_{name}"))
           for name in ("train", "val", "test")}
    drift = drift_accuracy(sess, splits.X_test, splits.y_test, splits.features, cfg or CardCfg(), splits.spec)
    measured = drift["drift_accuracy"]
    note = ("no drift kind applies to these features (card.drift_kinds)" if measured is None else
            f"mean test accuracy over {', '.join(drift['drift_curves'])} at severities "
            f"{', '.join(f'{s:g}' for s in drift['drift_severities'])} (ottimo.monitor.simulate, seed "
            f"{drift['drift_seed']}): "
            f"{measured - acc['test']:+.4f} vs the unshifted test split")
    return {
        "train_accuracy": acc["train"], "val_accuracy": acc["val"], "test_accuracy": acc["test"],
        "train_test_gap": acc["train"] - acc["test"], "train_val_gap": acc["train"] - acc["val"],
        **drift, "drift_drop": None if measured is None else acc["test"] - measured, "drift_note": note,
        "drift_method": {
            "shift": "chosen features + severity x their test standard deviation",
            "scale": "features x (1 + severity)",
            "noise": "Gaussian noise, standard deviation = severity x the feature's test standard deviation",
            "rotate": "images turned by severity x 45 degrees",
            "blur": "Gaussian blur of sigma = severity pixels",
        },
    }


# --- 4. bias and fairness ----------------------------------------------------------------------------------------

def _edge(x: float) -> str:
    return f"{x:g}"


def slice_masks(test_col: np.ndarray, train_col: np.ndarray, spec: SliceCfg) -> list[tuple[str, np.ndarray]]:
    """Named boolean masks over the test rows: one per value (bins null), per quantile bin of the train split
    (bins N; tied quantiles merge), or per [e_i, e_i+1) between explicit edges (rows outside are left out)."""
    if spec.bins is None:
        values = np.unique(test_col)
        if len(values) > MAX_DISTINCT:
            raise ValueError(f"{len(values)} distinct values; give `bins` (a number of quantile bins or edges)")
        return [(f"= {_edge(v)}", test_col == v) for v in values]
    if isinstance(spec.bins, int):
        inner = np.unique(np.quantile(train_col, np.linspace(0, 1, spec.bins + 1)[1:-1]))
        idx = np.digitize(test_col, inner)
        names = [f"< {_edge(inner[0])}"] + [f"[{_edge(a)}, {_edge(b)})" for a, b in pairwise(inner)]
        names.append(f">= {_edge(inner[-1])}")
        return [(name, idx == i) for i, name in enumerate(names)]
    edges = np.asarray(spec.bins, dtype=float)
    idx = np.digitize(test_col, edges)
    return [(f"[{_edge(a)}, {_edge(b)})", idx == i + 1) for i, (a, b) in enumerate(pairwise(edges))]


def fairness_section(y: np.ndarray, pred: np.ndarray, labels: list[int], splits: Splits, cfg: CardCfg) -> dict:
    """Spread of per-class recall, and accuracy per slice of each configured column with its largest gap."""
    recall = precision_recall_fscore_support(y, pred, labels=list(range(len(labels))), zero_division=0)[1]
    worst = int(np.argmin(recall))
    columns, skipped = [], []
    for spec in cfg.slices:
        if spec.column not in splits.features:
            skipped.append({"column": spec.column, "reason": "not a feature of this data"})
            continue
        j = splits.features.index(spec.column)
        try:
            masks = slice_masks(splits.X_test[:, j], splits.X_train[:, j], spec)
        except ValueError as err:
            skipped.append({"column": spec.column, "reason": str(err)})
            continue
        rows = [{"slice": name, "rows": int(m.sum()),
                 "accuracy": _num((pred[m] == y[m]).mean()) if m.any() else None} for name, m in masks]
        counted = [r for r in rows if r["rows"] >= cfg.min_slice_rows]
        entry = {"column": spec.column, "bins": spec.bins, "slices": rows, "gap": None, "best": None, "worst": None}
        if len(counted) >= 2:
            best = max(counted, key=lambda r: r["accuracy"])
            low = min(counted, key=lambda r: r["accuracy"])
            entry |= {"gap": best["accuracy"] - low["accuracy"], "best": best["slice"], "worst": low["slice"]}
        columns.append(entry)
    gaps = [c for c in columns if c["gap"] is not None]
    largest = max(gaps, key=lambda c: c["gap"]) if gaps else None
    return {
        "per_class_recall": {str(labels[i]): float(r) for i, r in enumerate(recall)},
        "recall_spread": float(recall.max() - recall.min()),
        "min_class_recall": float(recall[worst]),
        "worst_class": labels[worst],
        "slices": columns,
        "skipped": skipped,
        "min_slice_rows": cfg.min_slice_rows,
        "slice_gap": largest["gap"] if largest else None,
        "largest_gap": {k: largest[k] for k in ("column", "gap", "best", "worst")} if largest else None,
    }


# --- 5. interpretability -----------------------------------------------------------------------------------------

class OnnxClassifier:
    """The estimator interface sklearn's permutation_importance asks for, around an onnxruntime session."""

    def __init__(self, sess: ort.InferenceSession):
        self.sess = sess

    def fit(self, X: np.ndarray, y: np.ndarray) -> OnnxClassifier:
        return self  # already trained: the ONNX graph is what is explained

    def predict(self, X: np.ndarray) -> np.ndarray:
        return predict(self.sess, np.ascontiguousarray(X, dtype=np.float32))


def _accuracy(est: OnnxClassifier, X: np.ndarray, y: np.ndarray) -> float:
    return float((est.predict(X) == y).mean())


def interpretability_section(sess: ort.InferenceSession, X: np.ndarray, y: np.ndarray, features: list[str],
                             cfg: CardCfg, spec: InputSpec | None = None) -> dict:
    """Permutation importance (drop in accuracy when one column is shuffled) on a seeded sample of test rows."""
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(len(X), size=min(cfg.importance_rows, len(X)), replace=False))
    res = permutation_importance(OnnxClassifier(sess), X[rows], y[rows], scoring=_accuracy,
                                 n_repeats=cfg.importance_repeats, random_state=cfg.seed)
    mean, std = res.importances_mean, res.importances_std
    order = np.lexsort((np.arange(len(mean)), -mean))  # most important first, ties by column order
    positive = np.clip(mean, 0, None)
    shape = image_shape(cfg, spec, len(features))
    return {
        "method": "Permutation importance on the ONNX model (sklearn.inspection.permutation_importance): "
                  "mean drop in accuracy when one feature's column is shuffled",
        "rows": len(rows), "repeats": cfg.importance_repeats, "seed": cfg.seed,
        "top": [{"feature": features[i], "importance": float(mean[i]), "std": float(std[i])}
                for i in order[: cfg.top_features]],
        "importances": {f: float(m) for f, m in zip(features, mean, strict=True)},
        "top5_share": _num(positive[order[:5]].sum() / positive.sum()) if positive.sum() > 0 else None,
        "image_shape": shape,
        "image_note": None if shape or cfg.image_shape is None or spec is not None and spec.kind == "sequence" else
        f"card.image_shape {cfg.image_shape} does not match {len(features)} features: no heat-map",
    }


# --- 7. scalability and cost -------------------------------------------------------------------------------------

def throughput_curve(sess: ort.InferenceSession, X: np.ndarray, cfg: CardCfg) -> list[dict]:
    """Rows/s (wall clock) and CPU-seconds per million rows (time.process_time: this process, all threads)
    at each batch size, each run for about `seconds_per_batch_size`."""
    out = []
    for b in cfg.batch_sizes:
        xb = shaped(sess, X[np.arange(b) % len(X)])
        for _ in range(3):
            sess.run([OUTPUT], {INPUT: xb})
        n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
        while n < 3 or time.perf_counter() - wall0 < cfg.seconds_per_batch_size:
            sess.run([OUTPUT], {INPUT: xb})
            n += 1
        wall, cpu, rows = time.perf_counter() - wall0, time.process_time() - cpu0, n * b
        cpu_m = cpu / rows * 1e6
        out.append({"batch": b, "rows_per_s": rows / wall, "cpu_s_per_million": cpu_m,
                    "cost_per_million": cpu_m / 3600 * cfg.price_per_cpu_hour})
    return out


def target_latency(path: Path, X: np.ndarray, evaluate: EvaluateCfg) -> list[dict]:
    """Per-call p50 / p95 with 95% bootstrap intervals on each of `evaluate.targets` (threads, rows per call)."""
    ts = latency.targets(evaluate)
    timed = latency.measure_targets({"model": path}, X, ts, evaluate.runs, evaluate.warmup, evaluate.bootstrap)
    return [{"target": t.name, "threads": t.threads, "batch": t.batch, "decides": t.name == evaluate.target,
             **{k: v for k, v in timed[t.name]["model"].metrics().items() if k != "calls"}} for t in ts]


def scalability_section(path: Path, X: np.ndarray, cfg: CardCfg, evaluate: EvaluateCfg) -> dict:
    p50, p95 = latency_ms(session(path, 1), X, evaluate.warmup, evaluate.runs)
    curve = throughput_curve(session(path, evaluate.threads), X, cfg)
    return {
        "p50_ms": p50, "p95_ms": p95, "latency_threads": 1, "latency_runs": evaluate.runs,
        "targets": target_latency(path, X, evaluate),
        "throughput_threads": evaluate.threads,
        "curve": curve,
        "max_throughput_rps": max(c["rows_per_s"] for c in curve),
        "cpu_s_per_million": curve[0]["cpu_s_per_million"],  # at batch 1: what online serving pays
        "cost_per_million": curve[0]["cost_per_million"],
        "price_per_cpu_hour": cfg.price_per_cpu_hour, "currency": cfg.currency,
        "cpu_timer": "time.process_time around InferenceSession.run (CPU of this process, all threads)",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "onnxruntime": ort.__version__},
    }


# --- 8. deployment readiness -------------------------------------------------------------------------------------

def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)


def _io(value: onnx.ValueInfoProto) -> dict:
    t = value.type.tensor_type
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}


def onnx_summary(path: Path) -> dict:
    """Opsets, operator counts (graph, subgraphs and local functions) and the input/output schema of a file."""
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in _nodes(model.graph))
    for fn in model.functions:
        ops.update(n.op_type for n in fn.node)
    opsets = {imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import}
    return {
        "opset": opsets.get("ai.onnx"), "opsets": opsets, "ir_version": int(model.ir_version),
        "operators": dict(sorted(ops.items())),
        "inputs": [_io(v) for v in model.graph.input], "outputs": [_io(v) for v in model.graph.output],
    }


_PEAK = """
import json, resource, sys
import numpy as np, onnxruntime as ort
def peak():  # VmHWM: this process's own peak RSS (Linux); ru_maxrss elsewhere (it can carry the parent's peak)
    try:
        line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024, "VmHWM"
    except (OSError, StopIteration):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (r if sys.platform == "darwin" else r * 1024), "ru_maxrss"
base, how = peak()
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
s.run(None, {i.name: np.ones((int(sys.argv[2]), *i.shape[1:]), np.int64 if i.type == "tensor(int64)" else np.float32)})
print(json.dumps({"base": base, "peak": peak()[0], "how": how}))
"""


def peak_memory(path: Path, batch: int, n_features: int) -> dict:
    """Peak RSS growth (MB) from creating a 1-thread session and running one batch, in a fresh process: its peak
    RSS (/proc VmHWM on Linux) after `import onnxruntime` vs after the run; and that process's peak RSS."""
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(batch), str(n_features)],
                          capture_output=True, text=True, timeout=120, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_memory_mb": (r["peak"] - r["base"]) / 1e6, "peak_rss_mb": r["peak"] / 1e6, "memory_batch": batch,
            "memory_method": f"peak RSS ({r['how']}) of a fresh process after `import onnxruntime` vs after "
                             "creating a 1-thread session and running the largest batch"}


def deployment_section(path: Path, n_features: int, p95_1thread: float, max_p95_ms: float, cfg: CardCfg,
                       classes: list | None = None) -> dict:
    """The file as a deployer meets it: opsets, operators, input/output schema, the classes in output order (those
    of the data revision, and those the file's metadata carries: None for a file logged before they were
    recorded), size, peak memory, and whether one thread meets the gate's latency bound."""
    summary = onnx_summary(path)
    return {
        **summary, "classes": classes, "classes_in_file": read_classes(path),
        "size_mb": path.stat().st_size / 1e6, "size_bytes": path.stat().st_size,
        **peak_memory(path, max(cfg.batch_sizes), n_features),
        "single_thread_p95_ms": p95_1thread, "max_p95_latency_ms": max_p95_ms,
        "single_thread_ok": float(p95_1thread <= max_p95_ms),
    }


# --- plots -------------------------------------------------------------------------------------------------------

def robustness_png(section: dict, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for kind, curve in section["curves"].items():
        ax.plot(section["severities"], curve, marker="o", label=kind)
    ax.set(xlabel="severity", ylabel="test accuracy", title="Robustness: accuracy under perturbation", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def importance_png(section: dict, path: Path) -> Path:
    """A heat-map of importance per pixel when the features form an image, else a bar chart of the top features."""
    fig = Figure(figsize=(6, 5) if section["image_shape"] else (7, 4))
    ax = fig.subplots()
    if section["image_shape"]:
        grid = np.array(list(section["importances"].values())).reshape(section["image_shape"])
        grid = grid.mean(axis=0) if grid.ndim == 3 else grid  # [C, H, W]: the mean over the channels
        lim = float(np.abs(grid).max()) or 1.0
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim)  # red helps accuracy, blue is noise below 0
        fig.colorbar(im, ax=ax, label="accuracy drop when shuffled")
        ax.set_title("Permutation importance per pixel")
    else:
        top = section["top"][::-1]
        ax.barh([t["feature"] for t in top], [t["importance"] for t in top], xerr=[t["std"] for t in top])
        ax.set(xlabel="accuracy drop when shuffled", title="Permutation importance (top features)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def throughput_png(section: dict, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    batches = [c["batch"] for c in section["curve"]]
    ax.plot(batches, [c["rows_per_s"] for c in section["curve"]], marker="o")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="rows / s",
           title=f"Throughput ({section['throughput_threads']} thread(s))")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# --- the whole card ----------------------------------------------------------------------------------------------

def measure_card(path: Path, splits: Splits, cfg: CardCfg, evaluate: EvaluateCfg, max_p95_ms: float,
                 out_dir: Path) -> ModelCard:
    """Every measured section of one ONNX file (lineage is added by the caller), with its PNGs in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sess = session(path, evaluate.threads)
    pred = predict(sess, splits.X_test)
    robustness = robustness_section(sess, splits.X_test, splits.y_test, splits.X_train, cfg, splits.spec)
    interpret = interpretability_section(sess, splits.X_test, splits.y_test, splits.features, cfg, splits.spec)
    scalability = scalability_section(path, splits.X_test, cfg, evaluate)
    plots = [
        confusion_png(splits.y_test, pred, splits.labels, out_dir / "confusion_matrix.png", "Test confusion matrix"),
        robustness_png(robustness, out_dir / "robustness.png"),
        importance_png(interpret, out_dir / "importance.png"),
        throughput_png(scalability, out_dir / "throughput.png"),
    ]
    return ModelCard(
        accuracy=accuracy_section(splits.y_test, pred, splits.labels),
        robustness=robustness,
        generalisation=generalisation_section(sess, splits, cfg),
        fairness=fairness_section(splits.y_test, pred, splits.labels, splits, cfg),
        interpretability=interpret,
        scalability=scalability,
        deployment=deployment_section(path, splits.X_test.shape[1], scalability["p95_ms"], max_p95_ms, cfg,
                                      splits.labels),
        plots=[p.name for p in plots],
        computed_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def compare(a: ModelCard, b: ModelCard) -> tuple[list[dict], dict[str, str]]:
    """Every figure side by side with the better one ("A", "B", "=", or "" when neither way is better),
    and per dimension the one that wins more of its figures ("A", "B", "tie" or "n/a")."""
    fa, fb = a.figures(), b.figures()
    rows = []
    for name, better in FIGURES.items():
        x, y = fa[name], fb[name]
        if better is None or math.isnan(x) or math.isnan(y):
            mark = ""
        elif math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12):
            mark = "="
        else:
            mark = "A" if (x > y) == (better == "higher") else "B"
        rows.append({"section": name.split(".")[0], "figure": name, "a": x, "b": y, "better": mark})
    dims = {}
    for section in SECTIONS:
        marks = [r["better"] for r in rows if r["section"] == section and r["better"] in {"A", "B", "="}]
        wins = marks.count("A") - marks.count("B")
        dims[section] = "n/a" if not marks else "tie" if wins == 0 else "A" if wins > 0 else "B"
    return rows, dims
