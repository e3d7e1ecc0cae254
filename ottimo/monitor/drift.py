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
from ottimo.monitor import estimate as est
from ottimo.monitor.summary import summary_frame
from ottimo.spec import InputSpec

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
    estimated_accuracy: float | None = None  # champion, without labels (CBPE calibrated on the reference split)
    estimate_low: float | None = None  # its band (drift.estimate_sigmas standard deviations)
    estimate_high: float | None = None
    estimate_alarm: float | None = None  # the line below which the estimate alarms (from reference chunks)
    estimated_previous_accuracy: float | None = None  # previous-champion, the same way
    estimated_previous_low: float | None = None
    estimated_previous_high: float | None = None
    multivariate_ratio: float | None = None  # window's PCA reconstruction error / the reference's
    multivariate_threshold: float | None = None
    multivariate_drift: bool = False
    impact: dict[str, float] = field(default_factory=dict)  # drifted column -> share of predictions it moves
    rare_predictions: dict[str, str] = field(default_factory=dict)  # class -> "6 of 300 (reference 10.0%)"

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
Proba = Callable[[pd.DataFrame], np.ndarray]  # rows -> class probabilities or logits, (rows, classes)


def assess(reference: pd.DataFrame, window: pd.DataFrame | None, rows: int, features: list[str], target: str,
           cfg: DriftCfg, predict: Predict, previous: Predict | None = None, proba: Proba | None = None,
           previous_proba: Proba | None = None, full: bool = True, per_column: bool = True,
           spec: InputSpec | None = None) -> Assessment:
    """Everything one drift check measures, without I/O: data and prediction drift of `window` (None: too few
    rows, nothing measured) against `reference`, both sampled to drift.max_rows; the multivariate (PCA) score;
    on its labelled rows the champion's accuracy (and `previous`'s, previous-champion, when there is one) and
    Evidently's quality figures; with `proba` (and `previous_proba`) the accuracy estimated without labels.
    `rows` is the window's size before sampling; `full` adds Evidently's per-column preset (the HTML report);
    without `per_column` Evidently is not run at all (the replay bench: its tests are the costly part). Images and
    sequences (`spec`) are compared on summary features (ottimo.monitor.summary), not raw pixels or token ids."""
    if window is None or rows < cfg.min_rows:
        return Assessment(Evidence(rows=rows, reference_rows=len(reference), sampled_rows=0, columns=len(features)))
    cur, ref = sample(window, cfg.max_rows, cfg.seed), sample(reference, cfg.max_rows, cfg.seed)
    ref, cur = ref.assign(**{PREDICTION: predict(ref)}), cur.assign(**{PREDICTION: predict(cur)})
    cols, sref, scur = compared(ref, cur, features, spec)
    if per_column:
        found, snapshot = detect(sref, scur, cols, cfg, full)
        reports: dict[str, object] = {"drift_report": snapshot}
    else:
        found, reports = {"drifted": [], "columns": len(cols), "sampled_rows": len(cur)}, {}
    ref_target = ref[target].to_numpy()
    extra: dict = {"reference_accuracy": float((ref[PREDICTION].to_numpy() == ref_target).mean()),
                   "rare_predictions": rare_predictions(ref[PREDICTION], cur[PREDICTION])}
    if cfg.estimate and proba is not None:
        extra |= estimated(ref, cur, ref[PREDICTION].to_numpy() == ref_target, proba, cfg, "estimate")
        if previous is not None and previous_proba is not None:
            extra |= estimated(ref, cur, previous(ref) == ref_target, previous_proba, cfg, "estimated_previous")
    if cfg.multivariate:
        j = est.joint_drift(sref[cols].to_numpy(dtype="float64"), scur[cols].to_numpy(dtype="float64"),
                            cfg.multivariate_variance, cfg.alert_sigmas, cfg.chunks, cfg.seed,
                            cfg.multivariate_threshold)
        extra |= {"multivariate_ratio": j.ratio, "multivariate_threshold": j.threshold, "multivariate_drift": j.drift}
    if cfg.impact_columns and cols is features:  # summary columns are no model input to move
        moved = est.impact(predict, ref, cur, movers(ref, cur, features, cfg.impact_columns))
        extra["impact"] = {c: v for c, v in moved.items() if v > 0}
    labelled = cur[cur[target].notna()] if target in cur else cur.iloc[:0]
    labelled = labelled.assign(**{target: like(labelled[target], ref[PREDICTION])}) if len(labelled) else labelled
    if len(labelled):
        reports["quality_report"] = qsnap = quality_report(ref, labelled, target)
        extra |= {
            "accuracy": float((labelled[PREDICTION] == labelled[target]).mean()),
            "previous_accuracy": None if previous is None else float(
                (previous(labelled) == labelled[target].to_numpy()).mean()),
            "quality": read_quality(qsnap)}
    return Assessment(Evidence(rows=rows, reference_rows=len(ref), labelled_rows=len(labelled), **found, **extra),
                      reports)


def compared(ref: pd.DataFrame, cur: pd.DataFrame, features: list[str],
             spec: InputSpec | None) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """The columns drift is measured on and the reference and window holding them (and the predictions): the
    features themselves for tabular rows, summary features for images and sequences (against the reference)."""
    if spec is None or spec.kind == "tabular":
        return features, ref, cur
    ref_s, cur_s = (summary_frame(f, features, spec, ref).assign(**{PREDICTION: f[PREDICTION].to_numpy()})
                    for f in (ref, cur))
    return [c for c in ref_s.columns if c != PREDICTION], ref_s, cur_s


def estimated(ref: pd.DataFrame, cur: pd.DataFrame, correct: np.ndarray, proba: Proba, cfg: DriftCfg,
              prefix: str) -> dict[str, float]:
    """CBPE of one model on the window: calibrated on the reference rows, band and (for the champion) alarm line."""
    cal = est.calibrate(proba(ref), correct)
    e = est.estimate(cal, proba(cur), cfg.estimate_sigmas)
    if prefix == "estimate":
        alarm = est.estimate_alarm(cal, len(cur), cfg.alert_sigmas, cfg.max_quality_drop, cfg.chunks, cfg.seed)
        return {"estimated_accuracy": e.accuracy, "estimate_low": e.low, "estimate_high": e.high,
                "estimate_alarm": alarm}
    return {f"{prefix}_accuracy": e.accuracy, f"{prefix}_low": e.low, f"{prefix}_high": e.high}


def movers(reference: pd.DataFrame, current: pd.DataFrame, features: list[str], n: int) -> list[str]:
    """The `n` feature columns whose window mean moved most, in the reference's standard deviations."""
    ref = reference[features].astype("float64")
    moved = (current[features].astype("float64").mean() - ref.mean()).abs() / ref.std(ddof=0).replace(0, 1e-9)
    moved = moved[moved > 0].sort_values(ascending=False)
    return list(moved.index[:n])


def rare_predictions(reference: pd.Series, current: pd.Series) -> dict[str, str]:
    """Classes the champion predicts at under half their share on the reference: a class it stopped seeing."""
    ref, cur = reference.value_counts(normalize=True), current.value_counts()
    return {str(k): f"{int(cur.get(k, 0))} of {len(current)} (reference {share:.1%})" for k, share in ref.items()
            if share >= 0.02 and cur.get(k, 0) / len(current) < share / 2}


def like(labels: pd.Series, predictions: pd.Series) -> pd.Series:
    """Labels as the same kind of value as the predictions they are compared with: integers (a 3.0 read back from a
    column with gaps is 3) or text."""
    if pd.api.types.is_numeric_dtype(predictions):
        num = pd.to_numeric(labels, errors="coerce")  # a text label never equals an integer class
        return num.astype("int64") if num.notna().all() and (num == num.round()).all() else num
    return labels.astype(str)


def realized(predictions: np.ndarray, rows: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """Correct and labelled counts of late labels `truth` for rows `rows` (positions) of a scored batch whose
    predictions were `predictions`; rows outside the batch are left out."""
    rows = np.asarray(rows, dtype="int64")
    inside = (rows >= 0) & (rows < len(predictions))
    made = pd.Series(np.asarray(predictions)[rows[inside]])
    hits = made.to_numpy() == like(pd.Series(np.asarray(truth, dtype=object)[inside]), made).to_numpy()
    return int(hits.sum()), int(inside.sum())


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


def quality_source(ev: Evidence, cfg: DriftCfg) -> str | None:
    """What the policy judges quality by: "labels" (drift.min_labelled_rows or more labelled rows, or labels and
    no estimate), "estimate" (too few labels and an estimate), or None (neither: quality not measured)."""
    if ev.accuracy is not None and (ev.labelled_rows >= cfg.min_labelled_rows or ev.estimated_accuracy is None):
        return "labels"
    return "estimate" if ev.estimated_accuracy is not None else None


def _band(value: float, low: float | None, high: float | None) -> str:
    return f"{value:.4f}" + ("" if low is None or high is None else f" [{low:.4f}, {high:.4f}]")


def decide(ev: Evidence, cfg: DriftCfg, has_previous: bool, in_cooldown: bool) -> Decision:
    """The policy, in order: too few rows → insufficient data; champion worse than previous-champion by more than
    `rollback_margin` points → rollback (on the labelled window, or on the estimates when the window has fewer
    than `min_labelled_rows` labels); data drift, multivariate drift, a drifted column that moves more than
    `max_quality_drop` % of the predictions, prediction drift (when `prediction_drift_retrains`), or a quality drop
    (measured past `max_quality_drop` points, or estimated below its alarm line) → retrain, unless a retrain ran
    within `cooldown_hours`; otherwise nothing. The reasons say which evidence was used, the prediction drift and
    the estimate. A pure function: the truth table is tested alone."""
    if ev.rows < cfg.min_rows:
        return Decision(INSUFFICIENT, [f"{ev.rows} rows in the window < drift.min_rows {cfg.min_rows}: "
                                       "no decision; the batches stay in the next window"])
    source = quality_source(ev, cfg)
    reasons: list[str] = []
    if ev.estimated_accuracy is not None:
        line = ("estimated accuracy without labels (CBPE) "
                f"{_band(ev.estimated_accuracy, ev.estimate_low, ev.estimate_high)}")
        if ev.estimate_alarm is not None:
            line += f", alarm below {ev.estimate_alarm:.4f}"
        if ev.reference_accuracy is not None:
            line += f"; {ev.reference_accuracy:.4f} on the reference"
        if ev.accuracy is not None:
            line += f"; measured {ev.accuracy:.4f} on {ev.labelled_rows} labelled rows"
        reasons.append(line)
    pred = (f"prediction drift: {'yes' if ev.prediction_drift else 'no'}" + (
        "" if ev.prediction_drift_score is None else f" (score {ev.prediction_drift_score:.4g})"))
    if ev.rare_predictions:
        pred += "; classes predicted far less than on the reference: " + ", ".join(
            f"{k}: {v}" for k, v in list(ev.rare_predictions.items())[:10])
    reasons.append(pred)
    if source == "labels" and ev.accuracy is not None and ev.previous_accuracy is not None:
        gap = (ev.previous_accuracy - ev.accuracy) * 100
        line = (f"champion accuracy {ev.accuracy:.4f} vs previous-champion {ev.previous_accuracy:.4f} on "
                f"{ev.labelled_rows} labelled rows: {gap:+.2f} points (rollback above {cfg.rollback_margin:.2f})")
        if gap > cfg.rollback_margin:
            return Decision(ROLLBACK, [line] + reasons)
        reasons.append(line)
    elif source == "estimate" and ev.estimated_previous_accuracy is not None and has_previous:
        gap = (ev.estimated_previous_accuracy - ev.estimated_accuracy) * 100
        line = (f"estimated (no labels: {ev.labelled_rows} labelled rows < drift.min_labelled_rows "
                f"{cfg.min_labelled_rows}) champion accuracy {ev.estimated_accuracy:.4f} vs previous-champion "
                f"{_band(ev.estimated_previous_accuracy, ev.estimated_previous_low, ev.estimated_previous_high)}: "
                f"{gap:+.2f} points (rollback above {cfg.rollback_margin:.2f})")
        if gap > cfg.rollback_margin:
            return Decision(ROLLBACK, [line] + reasons)
        reasons.append(line)
    elif source is not None and not has_previous:
        reasons.append("no previous-champion to compare with: rollback not possible")
    triggers = []
    if ev.dataset_drift:
        triggers.append(f"data drift: {ev.drifted_columns}/{ev.columns} columns drifted "
                        f"(share {ev.drift_share:.3f} >= {cfg.drift_share:.3f})")
    if ev.multivariate_drift:
        triggers.append(f"multivariate drift: PCA reconstruction error {ev.multivariate_ratio:.3f}x the "
                        f"reference's (alarm above {ev.multivariate_threshold:.3f}x)")
    moving = {c: v for c, v in ev.impact.items() if v * 100 > cfg.max_quality_drop}
    if moving:
        triggers.append("drifted column(s) that move the champion's predictions: " + ", ".join(
            f"{c} changes {v:.1%} of the reference predictions" for c, v in moving.items())
            + f" (> drift.max_quality_drop {cfg.max_quality_drop:.2f} points)")
    if ev.prediction_drift and cfg.prediction_drift_retrains:
        triggers.append(f"prediction drift (score {ev.prediction_drift_score:.4g})")
    quality = None
    if source == "labels" and ev.reference_accuracy is not None:
        drop = (ev.reference_accuracy - ev.accuracy) * 100
        if drop > cfg.max_quality_drop:
            triggers.append(f"quality drop {drop:.2f} points (accuracy {ev.accuracy:.4f} vs "
                            f"{ev.reference_accuracy:.4f} on the reference; max {cfg.max_quality_drop:.2f})")
        quality = f"no quality drop past {cfg.max_quality_drop:.2f} points on {ev.labelled_rows} labelled rows"
    elif source == "estimate" and ev.estimate_alarm is not None:
        if ev.estimated_accuracy < ev.estimate_alarm:
            triggers.append(f"estimated quality drop (no labels): accuracy {ev.estimated_accuracy:.4f} below the "
                            f"alarm line {ev.estimate_alarm:.4f} (reference {ev.reference_accuracy:.4f})")
        quality = ("no labels" if not ev.labelled_rows else f"{ev.labelled_rows} labelled rows < "
                   f"drift.min_labelled_rows {cfg.min_labelled_rows}") + (
            f": quality not measured; estimated accuracy {ev.estimated_accuracy:.4f} above the alarm line "
            f"{ev.estimate_alarm:.4f}")
    if triggers and in_cooldown:
        return Decision(NOTHING, triggers + [f"retrain due but a retrain ran within drift.cooldown_hours "
                                             f"({cfg.cooldown_hours:g} h): not retraining again yet"] + reasons)
    if triggers:
        return Decision(RETRAIN, triggers + reasons)
    multi = ("" if ev.multivariate_ratio is None else
             f", no multivariate drift ({ev.multivariate_ratio:.3f}x <= {ev.multivariate_threshold:.3f}x)")
    return Decision(NOTHING, [f"no data drift ({ev.drifted_columns}/{ev.columns} columns drifted, share "
                              f"{ev.drift_share:.3f} < {cfg.drift_share:.3f}){multi}; "
                              f"{quality or 'no labels: quality not measured'}"] + reasons)


def save_html(snapshot, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(path))
    return path
