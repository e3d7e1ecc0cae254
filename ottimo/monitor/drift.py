"""Drift evidence with Evidently 0.7 and the decision policy that acts on it.

`check` compares a window of production rows with the reference split the champion was trained on:
data drift per feature column (`DataDriftPreset`, tests and drifted-share threshold from `drift:` in
params.yaml), prediction drift (`ValueDrift` on the champion's predictions) and, on labelled rows,
classification quality (`ClassificationPreset`). `decide` turns the evidence into nothing | retrain | rollback.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ottimo.config import DriftCfg

PREDICTION = "prediction"
NOTHING, RETRAIN, ROLLBACK, INSUFFICIENT = "nothing", "retrain", "rollback", "insufficient data"


@dataclass(frozen=True)
class Evidence:
    """What one check measured; every field lands in the JSON summary, the numbers in MLflow metrics."""

    rows: int  # rows in the window (before sampling)
    reference_rows: int
    sampled_rows: int  # rows Evidently saw per side (window and reference are sampled down to drift.max_rows)
    columns: int = 0
    drifted_columns: int = 0
    drift_share: float = 0.0
    dataset_drift: bool = False
    drifted: list[str] = field(default_factory=list)  # names of the drifted feature columns
    prediction_drift_score: float | None = None
    prediction_drift: bool = False
    labelled_rows: int = 0
    accuracy: float | None = None  # champion on the labelled window
    reference_accuracy: float | None = None  # champion on the reference split
    previous_accuracy: float | None = None  # previous-champion on the same labelled window
    quality: dict[str, float] = field(default_factory=dict)  # Evidently's ClassificationPreset figures

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    action: str  # nothing | retrain | rollback | insufficient data
    reasons: list[str]


@dataclass(frozen=True)
class Assessment:
    """The evidence of one window and the Evidently reports behind it (name -> snapshot, for the HTML files)."""

    evidence: Evidence
    reports: dict[str, object] = field(default_factory=dict)


Predict = Callable[[pd.DataFrame], np.ndarray]  # rows -> predicted labels (the champion's ONNX session)


def assess(reference: pd.DataFrame, window: pd.DataFrame | None, rows: int, features: list[str], target: str,
           cfg: DriftCfg, predict: Predict, previous: Predict | None = None) -> Assessment:
    """Everything one drift check measures, without I/O: data and prediction drift of `window` (None: too few
    rows, nothing measured) against `reference`, both sampled to drift.max_rows; on its labelled rows the
    champion's accuracy (and `previous`'s, previous-champion, when there is one) and Evidently's quality figures.
    `rows` is the window's size before sampling."""
    if window is None or rows < cfg.min_rows:
        return Assessment(Evidence(rows=rows, reference_rows=len(reference), sampled_rows=0, columns=len(features)))
    cur, ref = sample(window, cfg.max_rows, cfg.seed), sample(reference, cfg.max_rows, cfg.seed)
    ref, cur = ref.assign(**{PREDICTION: predict(ref)}), cur.assign(**{PREDICTION: predict(cur)})
    found, snapshot = detect(ref, cur, features, cfg)
    reports: dict[str, object] = {"drift_report": snapshot}
    quality: dict = {}
    labelled = cur[cur[target].notna()].astype({target: "int64"})
    if len(labelled):
        reports["quality_report"] = qsnap = quality_report(ref, labelled, target)
        quality = {
            "accuracy": float((labelled[PREDICTION] == labelled[target]).mean()),
            "reference_accuracy": float((ref[PREDICTION] == ref[target]).mean()),
            "previous_accuracy": None if previous is None else float(
                (previous(labelled) == labelled[target].to_numpy()).mean()),
            "quality": read_quality(qsnap)}
    return Assessment(Evidence(rows=rows, reference_rows=len(ref), labelled_rows=len(labelled), **found, **quality),
                      reports)


def sample(df: pd.DataFrame, max_rows: int, seed: int) -> pd.DataFrame:
    """At most `max_rows` rows, drawn without replacement (seeded): memory and time stay bounded."""
    return df if len(df) <= max_rows else df.sample(n=max_rows, random_state=seed)


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, features: list[str], cfg: DriftCfg,
                 full: bool = True):
    """Run Evidently on features + prediction; `full` adds the DataDriftPreset (per-column tests and plots,
    what the HTML shows); without it only the drifted-columns count is computed, with the same tests."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=features, categorical_columns=[PREDICTION])
    tests = dict(drift_share=cfg.drift_share, method=cfg.method, threshold=cfg.threshold)
    metrics = [DataDriftPreset(columns=features, **tests) if full else DriftedColumnsCount(columns=features, **tests),
               ValueDrift(column=PREDICTION, method=cfg.prediction_method)]
    cols = features + [PREDICTION]
    with warnings.catch_warnings():  # stat tests on constant columns (digits' border pixels) warn; results hold
        warnings.simplefilter("ignore", RuntimeWarning)
        return Report(metrics, include_tests=True).run(
            Dataset.from_pandas(current[cols], data_definition=definition),
            Dataset.from_pandas(reference[cols], data_definition=definition))


def quality_report(reference: pd.DataFrame, current: pd.DataFrame, target: str):
    """Evidently's ClassificationPreset on the labelled rows (target vs the champion's prediction)."""
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.presets import ClassificationPreset

    definition = DataDefinition(categorical_columns=[target, PREDICTION], classification=[
        MulticlassClassification(target=target, prediction_labels=PREDICTION)])
    cols = [target, PREDICTION]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return Report([ClassificationPreset()], include_tests=True).run(
            Dataset.from_pandas(current[cols], data_definition=definition),
            Dataset.from_pandas(reference[cols], data_definition=definition))


def read_drift(snapshot, features: list[str]) -> dict:
    """Drifted count and share, drifted column names, prediction drift: from the snapshot's metrics and tests."""
    d = snapshot.dict()
    out: dict = {"drifted": [], "prediction_drift": False, "prediction_drift_score": None}
    for m in d["metrics"]:
        kind = m["config"]["type"]
        if kind.endswith("DriftedColumnsCount"):
            out["drifted_columns"], out["drift_share"] = int(m["value"]["count"]), float(m["value"]["share"])
        elif kind.endswith("ValueDrift") and m["config"]["column"] == PREDICTION:
            out["prediction_drift_score"] = float(m["value"])
    for t in d["tests"]:
        params = t.get("metric_config", {}).get("params", {})
        failed = str(getattr(t["status"], "value", t["status"])) == "FAIL"
        if params.get("type", "").endswith("ValueDrift") and failed:
            if params["column"] == PREDICTION:
                out["prediction_drift"] = True
            else:
                out["drifted"].append(params["column"])
        elif params.get("type", "").endswith("DriftedColumnsCount"):
            out["dataset_drift"] = failed
    out["columns"] = len(features)
    return out


def read_quality(snapshot) -> dict[str, float]:
    """Scalar figures of the ClassificationPreset (accuracy, precision, recall, F1)."""
    out = {}
    for m in snapshot.dict()["metrics"]:
        if isinstance(m["value"], int | float | np.floating):
            out[m["config"]["type"].rsplit(":", 1)[-1].lower()] = float(m["value"])
    return out


def detect(reference: pd.DataFrame, current: pd.DataFrame, features: list[str], cfg: DriftCfg,
           full: bool = True) -> tuple[dict, object]:
    """Data and prediction drift of `current` against `reference`, both sampled to drift.max_rows first."""
    ref = sample(reference, cfg.max_rows, cfg.seed)
    cur = sample(current, cfg.max_rows, cfg.seed)
    snapshot = drift_report(ref, cur, features, cfg, full)
    return read_drift(snapshot, features) | {"sampled_rows": len(cur)}, snapshot


def decide(ev: Evidence, cfg: DriftCfg, has_previous: bool, in_cooldown: bool) -> Decision:
    """The policy, in order: too few rows → insufficient data; champion worse than previous-champion on the
    labelled window by more than `rollback_margin` points → rollback; data drift (or prediction drift when
    `prediction_drift_retrains`) or a quality drop past `max_quality_drop` points → retrain, unless a retrain
    ran within `cooldown_hours`; otherwise nothing. A pure function: the truth table is tested alone."""
    if ev.rows < cfg.min_rows:
        return Decision(INSUFFICIENT, [f"{ev.rows} rows in the window < drift.min_rows {cfg.min_rows}: "
                                       "no decision; the batches stay in the next window"])
    reasons: list[str] = []
    if ev.accuracy is not None and ev.previous_accuracy is not None:
        gap = (ev.previous_accuracy - ev.accuracy) * 100
        line = (f"champion accuracy {ev.accuracy:.4f} vs previous-champion {ev.previous_accuracy:.4f} on "
                f"{ev.labelled_rows} labelled rows: {gap:+.2f} points (rollback above {cfg.rollback_margin:.2f})")
        if gap > cfg.rollback_margin:
            return Decision(ROLLBACK, [line])
        reasons.append(line)
    elif ev.accuracy is not None and not has_previous:
        reasons.append("no previous-champion to compare with: rollback not possible")
    triggers = []
    if ev.dataset_drift:
        triggers.append(f"data drift: {ev.drifted_columns}/{ev.columns} columns drifted "
                        f"(share {ev.drift_share:.3f} >= {cfg.drift_share:.3f})")
    if ev.prediction_drift and cfg.prediction_drift_retrains:
        triggers.append(f"prediction drift (score {ev.prediction_drift_score:.4g})")
    if ev.accuracy is not None and ev.reference_accuracy is not None:
        drop = (ev.reference_accuracy - ev.accuracy) * 100
        if drop > cfg.max_quality_drop:
            triggers.append(f"quality drop {drop:.2f} points (accuracy {ev.accuracy:.4f} vs "
                            f"{ev.reference_accuracy:.4f} on the reference; max {cfg.max_quality_drop:.2f})")
    if triggers and in_cooldown:
        return Decision(NOTHING, triggers + [f"retrain due but a retrain ran within drift.cooldown_hours "
                                             f"({cfg.cooldown_hours:g} h): not retraining again yet"] + reasons)
    if triggers:
        return Decision(RETRAIN, triggers + reasons)
    return Decision(NOTHING, [f"no data drift ({ev.drifted_columns}/{ev.columns} columns drifted, share "
                              f"{ev.drift_share:.3f} < {cfg.drift_share:.3f}), no quality drop past "
                              f"{cfg.max_quality_drop:.2f} points"] + reasons)


def save_html(snapshot, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(path))
    return path
