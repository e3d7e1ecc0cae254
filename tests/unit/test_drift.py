"""Unit tests of the production loop's core: the decision policy, the drift simulator, Evidently detection,
and batch validation and quarantine (registry rollback: tests/flows/test_production_loop.py)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ottimo.config import DriftCfg, LimitsCfg
from ottimo.data import batches
from ottimo.data.tables import DataValidationError, builtin_frame
from ottimo.monitor import simulate
from ottimo.monitor.drift import INSUFFICIENT, NOTHING, RETRAIN, ROLLBACK, Evidence, decide, detect

CFG = DriftCfg(min_rows=100, drift_share=0.5, max_quality_drop=5.0, rollback_margin=5.0, cooldown_hours=24)
DIGITS = builtin_frame("digits")
FEATURES = [c for c in DIGITS.columns if c != "target"]


def ev(**kw) -> Evidence:
    return Evidence(**({"rows": 500, "reference_rows": 180, "sampled_rows": 500, "columns": 64} | kw))


@pytest.mark.parametrize(("evidence", "has_previous", "cooldown", "action"), [
    (ev(rows=99, dataset_drift=True), True, False, INSUFFICIENT),  # too few rows: nothing acts, drift or not
    (ev(), False, False, NOTHING),
    (ev(dataset_drift=True, drift_share=0.6), False, False, RETRAIN),
    (ev(dataset_drift=True, drift_share=0.6), False, True, NOTHING),  # cooldown stops a retrain storm
    (ev(accuracy=0.90, reference_accuracy=0.96), False, False, RETRAIN),  # 6-point quality drop
    (ev(accuracy=0.92, reference_accuracy=0.96), False, False, NOTHING),  # 4 points: within max_quality_drop
    (ev(prediction_drift=True, prediction_drift_score=0.001), False, False, NOTHING),  # off by default
    (ev(accuracy=0.80, previous_accuracy=0.90, reference_accuracy=0.96), True, False, ROLLBACK),
    (ev(accuracy=0.80, previous_accuracy=0.90, dataset_drift=True), True, True, ROLLBACK),  # rollback first
    (ev(accuracy=0.93, previous_accuracy=0.95, reference_accuracy=0.95), True, False, NOTHING),  # 2 < margin
    (ev(accuracy=0.80, reference_accuracy=0.96), False, False, RETRAIN),  # no previous: no rollback possible
])
def test_policy_truth_table(evidence, has_previous, cooldown, action):
    decision = decide(evidence, CFG, has_previous, cooldown)
    assert decision.action == action, decision.reasons
    assert decision.reasons


def test_policy_reasons_name_the_evidence():
    d = decide(ev(dataset_drift=True, drifted_columns=40, drift_share=0.625), CFG, False, True)
    assert "40/64 columns drifted" in d.reasons[0] and "cooldown" in d.reasons[1]
    d = decide(ev(accuracy=0.8, reference_accuracy=0.81), CFG, False, False)
    assert "no previous-champion" in " ".join(d.reasons)
    assert decide(ev(prediction_drift=True, prediction_drift_score=0.001),
                  CFG.model_copy(update={"prediction_drift_retrains": True}), False, False).action == RETRAIN


@pytest.mark.parametrize("kind", ["shift", "scale", "noise", "rotate", "blur", "prior", "missing"])
def test_simulator_is_seeded_and_shifts(kind):
    src = DIGITS.iloc[:300]
    a = simulate.shift(src, FEATURES, "target", kind, 0.5, seed=1, image_shape=[8, 8])
    b = simulate.shift(src, FEATURES, "target", kind, 0.5, seed=1, image_shape=[8, 8])
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(src)
    pd.testing.assert_frame_equal(simulate.shift(src, FEATURES, "target", "none", 0.5, seed=1), src)
    if kind == "shift":
        assert (a[FEATURES].mean() >= src[FEATURES].mean()).all()
        assert (a["pixel_0_0"] == 0).all()  # a blank border pixel stays blank
    if kind == "prior":
        assert a["target"].lt(5).mean() > src["target"].lt(5).mean() + 0.2
    if kind == "missing":
        assert 0.4 < a[FEATURES].isna().to_numpy().mean() < 0.6


def test_simulator_refuses_what_it_cannot_do(tmp_path):
    src = DIGITS.iloc[:50]
    with pytest.raises(simulate.SimulationError, match="card.image_shape"):
        simulate.shift(src, FEATURES, "target", "rotate", 0.5, seed=0, image_shape=None)
    with pytest.raises(simulate.SimulationError, match="unknown kind"):
        simulate.shift(src, FEATURES, "target", "tilt", 0.5, seed=0)
    with pytest.raises(simulate.SimulationError, match="unknown feature"):
        simulate.shift(src, FEATURES, "target", "shift", 0.5, seed=0, columns=["nope"])
    frames = simulate.batches(src, FEATURES, "target", "scale", 0.3, 2, 40, seed=3, labels=False,
                              columns=["pixel_3_3"])
    paths = simulate.write(frames, tmp_path, "x", "csv")
    assert [p.name for p in paths] == ["x-000.csv", "x-001.csv"]
    assert "target" not in pd.read_csv(paths[0]).columns and len(pd.read_csv(paths[1])) == 40


def test_evidently_flags_a_shift_and_not_a_resample():
    ref, rest = DIGITS.iloc[:300].copy(), DIGITS.iloc[300:].copy()
    for df in (ref, rest):
        df["prediction"] = df["target"]
    clean, _ = detect(ref, rest.sample(300, random_state=0), FEATURES, CFG, full=False)
    moved = simulate.shift(rest.sample(300, random_state=1), FEATURES, "target", "shift", 0.5, seed=1)
    shifted, _ = detect(ref, moved, FEATURES, CFG, full=False)
    assert not clean["dataset_drift"] and clean["drift_share"] < 0.2
    assert shifted["dataset_drift"] and shifted["drifted_columns"] > 32
    capped, _ = detect(ref, rest, FEATURES, CFG.model_copy(update={"max_rows": 200}), full=False)
    assert capped["sampled_rows"] == 200  # above drift.max_rows the window is sampled


def test_batch_validation_and_quarantine(tmp_path):
    schema = {"features": FEATURES, "target": "target", "labels": list(range(10))}
    good = tmp_path / "incoming" / "good.parquet"
    good.parent.mkdir()
    DIGITS.iloc[:20].drop(columns=["target"]).to_parquet(good)  # unlabelled is fine
    limits = LimitsCfg()
    assert len(batches.validate_batch(tmp_path, good, schema, limits)) == 20 and batches.pending(good.parent) == [good]
    bad_label = DIGITS.iloc[:20].copy()
    bad_label.loc[3, "target"] = 42
    cases = {"missing column": (DIGITS.iloc[:5].drop(columns=["pixel_2_2"]), "missing ['pixel_2_2']"),
             "bad label": (bad_label, "unknown label"), "empty": (DIGITS.iloc[:0], "no data rows")}
    for name, (df, message) in cases.items():
        path = tmp_path / "incoming" / f"{name}.csv"
        df.to_csv(path, index=False)
        with pytest.raises(DataValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
            batches.validate_batch(tmp_path, path, schema, limits)
    bad = tmp_path / "incoming" / "bad label.csv"
    here = limits.model_copy(update={"quarantine_dir": "quarantine"})
    moved, note = batches.quarantine(tmp_path, bad, "label 42", here)
    assert moved.is_file() and moved.parent == tmp_path / "quarantine" and "label 42" in note.read_text()
    assert not (tmp_path / "incoming" / "bad label.csv").exists()
    out = batches.write_predictions(good, np.array([0, 9] * 10), list(range(10)), "3")
    assert batches.pending(good.parent) == [tmp_path / "incoming" / f"{n}.csv" for n in ("empty", "missing column")]
    assert pd.read_parquet(out)["model_version"].eq("3").all()


def test_drift_and_score_sections_are_validated():
    from ottimo.config import ConfigError, load_params, parse_params

    p = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    assert (p.drift.min_rows, p.drift.drift_share, p.score.incoming) == (100, 0.5, "data/incoming")
    with pytest.raises(ConfigError, match="drift.drift_share"):
        parse_params({"drift": {"drift_share": 1.5}})
    with pytest.raises(ConfigError, match="drift.cooldown"):
        parse_params({"drift": {"cooldown": 3}})


def test_assess_measures_drift_and_quality_without_io():
    """The pure part of a drift check: predictions from the given predictors, accuracy on the labelled rows only,
    previous-champion's accuracy from its own predictor, nothing measured below drift.min_rows."""
    from ottimo.monitor.drift import assess

    df = builtin_frame("digits")
    features = [c for c in df.columns if c != "target"]
    reference, window = df.iloc[:600].copy(), df.iloc[600:900].copy()
    window.loc[window.index[:100], "target"] = None  # a third of the window unlabelled
    cfg = DriftCfg()
    truth = lambda rows: rows["target"].fillna(0).to_numpy(dtype="int64")  # noqa: E731  a perfect champion
    wrong = lambda rows: (truth(rows) + 1) % 10  # noqa: E731  a previous-champion that is always wrong
    found = assess(reference, window, len(window), features, "target", cfg, truth, wrong)
    ev = found.evidence
    assert ev.rows == 300 and ev.labelled_rows == 200 and ev.accuracy == 1.0 and ev.previous_accuracy == 0.0
    assert ev.reference_accuracy == 1.0 and set(found.reports) == {"drift_report", "quality_report"}
    assert not ev.dataset_drift  # same distribution: the digits rows are shuffled
    none = assess(reference, None, 10, features, "target", cfg, truth)
    assert none.evidence.sampled_rows == 0 and none.evidence.accuracy is None and none.reports == {}
