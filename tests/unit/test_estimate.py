"""Monitoring without labels: the accuracy estimate (CBPE) and its band, the multivariate (PCA) check, the
importance-weighted per-column rule, and the policy acting on them (ottimo.monitor.estimate, drift.decide).

Champion and previous-champion are scikit-learn logistic regressions on digits (seeded, a second to fit): real
probabilities, real mistakes under shift, no ONNX needed for the pure core."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from ottimo.config import DriftCfg
from ottimo.data.tables import builtin_frame
from ottimo.monitor import estimate as est
from ottimo.monitor import simulate
from ottimo.monitor.drift import NOTHING, RETRAIN, ROLLBACK, Evidence, assess, decide

DIGITS = builtin_frame("digits")
FEATURES = [c for c in DIGITS.columns if c != "target"]
_rest, REFERENCE = train_test_split(DIGITS, test_size=0.1, stratify=DIGITS.target, random_state=0)
TRAIN, POOL = train_test_split(_rest, test_size=0.4, stratify=_rest.target, random_state=0)
GOOD = LogisticRegression(max_iter=2000).fit(TRAIN[FEATURES] / 16, TRAIN.target)
_noisy = TRAIN.target.to_numpy().copy()
_flip = np.random.default_rng(0).random(len(_noisy)) < 0.5
_noisy[_flip] = np.random.default_rng(1).integers(0, 10, _flip.sum())
WORSE = LogisticRegression(max_iter=2000, C=0.01).fit(TRAIN[FEATURES] / 16, _noisy)  # ~8 points worse
CFG = DriftCfg()


def labels(model):
    return lambda rows: model.predict(rows[FEATURES] / 16)


def proba(model):
    return lambda rows: model.predict_proba(rows[FEATURES] / 16)


def window(kind: str, severity: float, seed: int, rows: int = 300):
    cur = POOL.sample(rows, random_state=seed)
    if kind == "step":  # one informative pixel stuck far above anything training saw (the batch)
        return cur.assign(pixel_3_4=38.8)
    if kind == "joint":  # every column shuffled on its own: each marginal kept, the joint structure gone
        rng = np.random.default_rng(seed)
        return cur.assign(**{c: rng.permutation(cur[c].to_numpy()) for c in FEATURES})
    return simulate.shift(cur, FEATURES, "target", kind, severity, seed, image_shape=[8, 8])


def unlabelled(df):
    return df.assign(target=np.nan)


def check(champion, previous, cur, cfg=CFG, has_previous=True):
    found = assess(REFERENCE, cur, len(cur), FEATURES, "target", cfg, labels(champion),
                   labels(previous) if previous is not None else None, proba(champion),
                   proba(previous) if previous is not None else None, full=False)
    return found.evidence, decide(found.evidence, cfg, has_previous, False)


@pytest.mark.parametrize(("kind", "severity"), [("none", 0), ("shift", 0.5), ("noise", 0.5), ("blur", 0.5),
                                                ("prior", 0.6), ("scale", 0.2)])
def test_the_estimate_tracks_true_accuracy_within_its_band(kind, severity):
    ref_ok = GOOD.predict(REFERENCE[FEATURES] / 16) == REFERENCE.target.to_numpy()
    cal = est.calibrate(GOOD.predict_proba(REFERENCE[FEATURES] / 16), ref_ok)
    for seed in range(5):
        cur = window(kind, severity, seed, rows=200)
        truth = float((GOOD.predict(cur[FEATURES] / 16) == cur.target.to_numpy()).mean())
        e = est.estimate(cal, GOOD.predict_proba(cur[FEATURES] / 16), CFG.estimate_sigmas)
        assert e.low <= truth <= e.high, (kind, seed, truth, e)
        assert e.high - e.low < 0.2  # a band, not "somewhere between 0 and 1"


def test_logits_are_read_as_probabilities():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(est.top(logits), est.softmax(logits).max(axis=1))
    np.testing.assert_allclose(est.top(np.array([[0.2, 0.8]])), [0.8])


def test_a_single_feature_step_change_that_ruins_accuracy_is_acted_on_without_labels():
    cur = window("step", 0, seed=1)
    truth = float((GOOD.predict(cur[FEATURES] / 16) == cur.target.to_numpy()).mean())
    assert truth < 0.85  # it does ruin accuracy (0.96 on the reference)
    only_columns = CFG.model_copy(update={"multivariate": False})  # the per-column rule, weighted by importance
    ev, d = check(GOOD, WORSE, unlabelled(cur), only_columns)
    assert ev.labelled_rows == 0 and not ev.dataset_drift  # 1-2 of 64 columns: the share rule cannot see it
    assert d.action == RETRAIN and "pixel_3_4 changes" in d.reasons[0], d.reasons
    ev, d = check(GOOD, WORSE, unlabelled(cur))
    assert d.action == RETRAIN and any(r.startswith("multivariate drift") for r in d.reasons)
    assert any("estimated accuracy without labels (CBPE)" in r for r in d.reasons)
    assert any(r.startswith("prediction drift: ") for r in d.reasons)


def test_an_unlabelled_silent_collapse_is_caught_by_the_estimate():
    cur = unlabelled(window("blur", 1.0, seed=2))
    ev, d = check(GOOD, None, cur, CFG.model_copy(update={"multivariate": False, "impact_columns": 0}), False)
    assert ev.estimated_accuracy < ev.estimate_alarm and d.action == RETRAIN
    assert any(r.startswith("estimated quality drop (no labels)") for r in d.reasons), d.reasons


def test_a_rollback_is_decided_without_labels_and_not_on_harmless_drift():
    cur = unlabelled(window("none", 0, seed=3))
    ev, d = check(WORSE, GOOD, cur)  # the champion really is worse than previous-champion
    assert d.action == ROLLBACK and "estimated (no labels" in d.reasons[0], d.reasons
    assert ev.estimated_previous_accuracy - ev.estimated_accuracy > CFG.rollback_margin / 100
    for kind, severity in (("none", 0), ("shift", 0.3), ("noise", 0.3)):
        ev, d = check(GOOD, WORSE, unlabelled(window(kind, severity, seed=4)))
        assert d.action != ROLLBACK, (kind, d.reasons)
        if kind == "none":
            assert d.action == NOTHING and "no labels: quality not measured" in d.reasons[0], d.reasons


def test_the_multivariate_check_fires_on_a_joint_shift_the_per_column_tests_miss():
    joint = unlabelled(window("joint", 0, seed=5))
    cfg = CFG.model_copy(update={"estimate": False, "impact_columns": 0})
    ev, d = check(GOOD, None, joint, cfg, False)
    assert not ev.dataset_drift and ev.drift_share < 0.1  # Evidently's per-column tests: nothing
    assert ev.multivariate_drift and ev.multivariate_ratio > ev.multivariate_threshold
    assert d.action == RETRAIN and d.reasons[0].startswith("multivariate drift")
    clean, _ = check(GOOD, None, unlabelled(window("none", 0, seed=5)), cfg, False)
    assert not clean.multivariate_drift
    fixed = est.joint_drift(REFERENCE[FEATURES].to_numpy(), joint[FEATURES].to_numpy(), 0.65, 3, 50, 0, 5.0)
    assert fixed.threshold == 5.0 and not fixed.drift  # drift.multivariate_threshold overrides the derived line


def ev(**kw) -> Evidence:
    return Evidence(**({"rows": 500, "reference_rows": 180, "sampled_rows": 500, "columns": 64,
                        "reference_accuracy": 0.96, "estimate_alarm": 0.91} | kw))


@pytest.mark.parametrize(("evidence", "has_previous", "action", "says"), [
    (ev(estimated_accuracy=0.95), False, NOTHING, "no labels: quality not measured"),
    (ev(estimated_accuracy=0.80), False, RETRAIN, "estimated quality drop (no labels)"),
    (ev(estimated_accuracy=0.80, estimated_previous_accuracy=0.93), True, ROLLBACK, "estimated (no labels"),
    (ev(estimated_accuracy=0.80, estimated_previous_accuracy=0.93), False, RETRAIN, "estimated quality drop"),
    (ev(estimated_accuracy=0.93, estimated_previous_accuracy=0.95), True, NOTHING, "quality not measured"),
    # enough labels: the measured figures decide, the estimate is only reported
    (ev(estimated_accuracy=0.80, estimated_previous_accuracy=0.95, accuracy=0.95, previous_accuracy=0.95,
        labelled_rows=200), True, NOTHING, "no quality drop past 5.00 points on 200 labelled rows"),
    # too few labels (10 < min_labelled_rows): the estimate decides, the measured figure is reported beside it
    (ev(estimated_accuracy=0.95, accuracy=0.70, previous_accuracy=0.95, labelled_rows=10), True, NOTHING,
     "measured 0.7000 on 10 labelled rows"),
    (ev(multivariate_drift=True, multivariate_ratio=1.5, multivariate_threshold=1.1), False, RETRAIN,
     "multivariate drift: PCA reconstruction error 1.500x"),
    (ev(impact={"pixel_3_4": 0.14, "pixel_0_1": 0.01}), False, RETRAIN, "pixel_3_4 changes 14.0%"),
    (ev(impact={"pixel_0_1": 0.01}), False, NOTHING, "no labels: quality not measured"),
    (ev(prediction_drift=True, prediction_drift_score=0.001, rare_predictions={"3": "6 of 300 (reference 10.0%)"}),
     False, NOTHING, "classes predicted far less than on the reference: 3: 6 of 300"),
])
def test_policy_on_estimates_truth_table(evidence, has_previous, action, says):
    d = decide(evidence, CFG, has_previous, False)
    assert d.action == action, d.reasons
    assert says in " | ".join(d.reasons), d.reasons
    assert any(r.startswith("prediction drift: ") for r in d.reasons)


def test_rows_outside_the_training_data_are_held_back_with_their_reason():
    from ottimo.monitor import holdback

    rows = POOL.iloc[:40].reset_index(drop=True)
    rows.loc[:9, "pixel_3_4"] = 38.8  # the step change: training never exceeds 16
    rows.loc[10, "target"] = 11  # a class training never saw
    rows.loc[11, "pixel_2_2"] = np.nan
    rows.loc[12:, "pixel_4_4"] = rows.loc[12:, "pixel_4_4"] + 3  # a mild shift stays (within half the range)
    parts = holdback.split(rows, TRAIN, FEATURES, "target", list(range(10)), 0.5, None)
    assert len(parts.held) == 12 and len(parts.kept) == 28
    assert parts.held[holdback.REASON].iloc[0].endswith("pixel_3_4 = 38.8 [0, 16]")
    assert "label outside the training classes" in parts.held.loc[10, holdback.REASON]
    assert "missing or non-finite" in parts.held.loc[11, holdback.REASON]
    assert any(line.startswith("10 row(s): far outside the training range") for line in parts.summary)
    assert len(holdback.split(rows, TRAIN, FEATURES, "target", list(range(10)), None, None).held) == 2
    assert len(holdback.split(rows, TRAIN, FEATURES, "target", list(range(10)), 0.5, 30.0).held) == 12


def test_late_labels_give_the_realized_accuracy_of_the_predictions_made_then():
    from ottimo.monitor.drift import realized

    made = np.array([1, 2, 3, 4, 5])
    assert realized(made, np.array([0, 1, 4, 9]), np.array([1, 0, 5, 5])) == (2, 3)  # row 9 is not in the batch
