"""Drift checks and the hold-back of images and token sequences run on summary features (ottimo.monitor.summary):
drifted windows (brighter or rotated images, longer sequences, another token distribution) are detected, a
resample of the reference is not; tabular rows are compared column by column as before."""

import numpy as np
import pandas as pd
import pytest

from ottimo.config import DataCfg, DriftCfg
from ottimo.data import sequences
from ottimo.data.tables import builtin_frame
from ottimo.monitor import holdback, simulate
from ottimo.monitor.drift import assess, compared, decide
from ottimo.monitor.summary import sequence_summary, summary_frame, token_classes
from ottimo.spec import InputSpec

CFG = DriftCfg(min_rows=100, impact_columns=0, estimate=False)
IMAGE = InputSpec("image", (1, 8, 8), "float32")
SEQ = InputSpec("sequence", (32,), "int64", 200, 0)
DIGITS = builtin_frame("digits")
PIXELS = [c for c in DIGITS.columns if c != "target"]
SEQ_CFG = DataCfg(path="s.parquet", builtin="sequences", input={"kind": "sequence"})
TOKENS = sequences.feature_names(32)


def constant(rows: pd.DataFrame) -> np.ndarray:
    return np.zeros(len(rows), dtype="int64")  # a champion that always says 0: no prediction drift


def digits_split() -> tuple[pd.DataFrame, pd.DataFrame]:
    order = np.random.default_rng(0).permutation(len(DIGITS))
    return DIGITS.iloc[order[:900]], DIGITS.iloc[order[900:]].reset_index(drop=True)


def check(reference, window, features, spec):
    found = assess(reference, window, len(window), features, "target", CFG, constant, spec=spec, full=False)
    return found.evidence


# --- the summary features -----------------------------------------------------------------------------------------

def test_image_summary_is_per_channel_statistics_and_quadrants():
    spec = InputSpec("image", (2, 2, 2), "float32")
    rows = pd.DataFrame([np.arange(8.0), np.zeros(8)], columns=[f"p{i}" for i in range(8)], index=[5, 9])
    s = summary_frame(rows, list(rows.columns), spec)
    assert list(s.index) == [5, 9] and s.shape == (2, 16)
    stats = s.loc[5, ["ch0_mean", "ch0_std", "ch0_min", "ch0_max"]].tolist()
    assert stats == [1.5, pytest.approx(np.std([0, 1, 2, 3])), 0.0, 3.0]
    assert s.loc[5, ["ch1_top_left", "ch1_top_right", "ch1_bottom_left", "ch1_bottom_right"]].tolist() == [4, 5, 6, 7]
    assert (s.loc[9] == 0).all()
    tabular = summary_frame(DIGITS.iloc[:3], PIXELS, InputSpec.tabular(64))
    assert tabular.equals(DIGITS.iloc[:3][PIXELS]) and summary_frame(DIGITS, PIXELS, None).shape == (1797, 64)


def test_sequence_summary_is_length_common_token_shares_rare_and_unseen():
    reference = np.array([[5, 5, 5, 5, 6, 6, 7, 0], [5, 5, 6, 6, 6, 8, 0, 0]] * 10)  # 7, 8: 1 of 13 tokens each
    common, rare, unseen = token_classes(reference, 0, 12, top=2, rare_mass=0.2)
    assert common.tolist() == [5, 6] and np.flatnonzero(rare).tolist() == [7, 8]  # 7 and 8: 2 of 13 tokens
    assert np.flatnonzero(token_classes(reference, 0, 12, rare_mass=0.1)[1]).tolist() == [7]  # 1 of 13 <= 0.1
    assert np.flatnonzero(unseen).tolist() == [1, 2, 3, 4, 9, 10, 11]  # the padding id 0 is none of them
    rows = np.array([[5, 6, 7, 9, 0, 0, 0, 0], [0] * 8])
    reference = np.array([[5] * 7 + [6]] * 19 + [[5, 5, 5, 5, 6, 6, 7, 8]])  # 7 and 8: 1 of 160 tokens each
    s = sequence_summary(rows, reference, 0, 12)  # rare: at most RARE_MASS (5%) of the reference's tokens
    assert s["length"].tolist() == [4, 0] and s["share_token_5"].tolist() == [0.25, 0]
    assert s["rare_share"].tolist() == [0.25, 0] and s["unseen_share"].tolist() == [0.25, 0]
    frame = summary_frame(pd.DataFrame(rows, columns=[f"t{i}" for i in range(8)]), [f"t{i}" for i in range(8)],
                          InputSpec("sequence", (8,), "int64", 12, 0),
                          pd.DataFrame(reference, columns=[f"t{i}" for i in range(8)]))
    assert list(frame.columns)[:2] == ["length", "share_token_5"] and frame.shape[0] == 2


def test_images_and_sequences_are_compared_on_summaries():
    ref, cur = digits_split()
    ref, cur = ref.assign(prediction=0), cur.assign(prediction=0)
    cols, sref, scur = compared(ref, cur, PIXELS, IMAGE)
    assert cols == ["ch0_mean", "ch0_std", "ch0_min", "ch0_max", "ch0_top_left", "ch0_top_right", "ch0_bottom_left",
                    "ch0_bottom_right"] and list(sref.columns) == cols + ["prediction"] and len(scur) == len(cur)
    assert compared(ref, cur, PIXELS, None)[0] is PIXELS  # tabular: the feature columns themselves


# --- drift detection ----------------------------------------------------------------------------------------------

def brighter(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(**{c: np.clip(frame[c] + 2.0, 0, 16) for c in PIXELS})


@pytest.mark.parametrize(("name", "shift"), [
    ("brightness", brighter),
    ("rotation", lambda f: simulate.shift(f, PIXELS, None, "rotate", 0.3, seed=1, image_shape=[8, 8])),
])
def test_a_drifted_image_window_is_detected_and_an_undrifted_one_is_not(name, shift):
    reference, pool = digits_split()
    window = pool.sample(400, random_state=1).drop(columns="target")
    calm = check(reference, window, PIXELS, IMAGE)
    assert calm.columns == 8 and not calm.dataset_drift and not calm.multivariate_drift
    assert decide(calm, CFG, False, False).action == "nothing"
    drifted = check(reference, shift(window), PIXELS, IMAGE)
    assert drifted.dataset_drift and drifted.multivariate_drift, (name, drifted)
    assert drifted.drift_share >= 0.5 and decide(drifted, CFG, False, False).action == "retrain"


def test_a_drifted_sequence_window_is_detected_and_an_undrifted_one_is_not():
    data = sequences.frame(SEQ_CFG)
    reference, pool = data.iloc[:1000], data.iloc[1000:]
    calm = check(reference, pool.sample(400, random_state=2).drop(columns="target"), TOKENS, SEQ)
    assert calm.columns == 13 and not calm.dataset_drift and not calm.multivariate_drift  # length, 10 tokens, 2
    longer = sequences.frame(SEQ_CFG.model_copy(update={"sequences": SEQ_CFG.sequences.model_copy(
        update={"min_length": 24}), "seed": 7})).iloc[:400]
    other = sequences.frame(SEQ_CFG.model_copy(update={"seed": 9})).iloc[:400]  # other common and marker tokens
    for name, window in (("longer", longer), ("other tokens", other)):
        ev = check(reference, window.drop(columns="target"), TOKENS, SEQ)
        assert ev.dataset_drift and ev.multivariate_drift, (name, ev)
        assert decide(ev, CFG, False, False).action == "retrain"


def test_tabular_rows_are_still_compared_per_column():
    reference, pool = digits_split()
    ev = check(reference, pool.sample(400, random_state=1).drop(columns="target"), PIXELS, None)
    assert ev.columns == 64 and not ev.dataset_drift


# --- hold-back ----------------------------------------------------------------------------------------------------

def test_images_are_held_back_by_their_summaries_and_sequences_by_their_vocabulary():
    training, pool = digits_split()
    rows = pool.iloc[:6].copy()
    rows.loc[1, PIXELS] = training[PIXELS].max().to_numpy()  # every pixel as bright as the brightest training one
    per_pixel = holdback.split(rows, training, PIXELS, "target", list(range(10)), 0.5, 1e9)
    assert len(per_pixel.held) == 0  # pixel by pixel it lies in the training range ...
    parts = holdback.split(rows, training, PIXELS, "target", list(range(10)), 0.5, 1e9, IMAGE)
    assert parts.held.index.tolist() == [1] and len(parts.kept) == 5  # ... as an image it is far too bright
    assert parts.held[holdback.REASON].iloc[0] == ("far outside the training range (drift.holdback_margin 0.5): "
                                                   "ch0_mean = 12.875 [2.89062, 6.54688]")

    data = sequences.frame(SEQ_CFG)
    training, rows = data.iloc[:1000], data.iloc[1000:1006].copy()
    rows.loc[1002, "token_3"] = 250
    parts = holdback.split(rows, training, TOKENS, "target", [0, 1, 2, 3], 0.5, 1e9, SEQ)
    assert parts.held.index.tolist() == [1002]
    assert parts.held[holdback.REASON].iloc[0] == ("a token id outside the vocabulary (0 .. 199): token_3 = 250")
    assert len(parts.kept) == 5
