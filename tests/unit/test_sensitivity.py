"""Accuracy-aware quantization: on a model with one layer INT8 breaks (an outlier weight), plain INT8 misses the
tolerance; the loop finds that layer first, keeps it in FP32 and ends within tolerance; a budget too small fails
with the reason. Labels are the FP32 model's own predictions, so FP32 accuracy is 1.0 and every flip counts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ottimo.compress.quantize import QuantOption
from ottimo.compress.sensitivity import accuracy_aware
from ottimo.onnx.measure import accuracy, predict, session
from tests.helpers.tiny_encoder import export, tokens

OUTLIER = 40.0
DYNAMIC = QuantOption("dynamic")


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    """The FP32 file with an outlier weight in its last feed-forward layer, calibration rows, labelled rows."""
    src = export(tmp_path_factory.mktemp("aaq") / "fp32.onnx", outlier=OUTLIER)[0]
    X = tokens(256, seed=3)
    return src, tokens(64, seed=2), X, predict(session(src), X)


@pytest.fixture(scope="module")
def recovered(sensitive, tmp_path_factory):
    src, calib, X, y = sensitive
    dst = tmp_path_factory.mktemp("aaq-out") / "int8.onnx"
    return dst, accuracy_aware(src, dst, DYNAMIC, calib, X, y, tolerance_points=1.0, max_excluded=4)


def weight_of(path, node_name: str) -> np.ndarray:
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name == node_name)
    init = {i.name: i for i in model.graph.initializer}
    return numpy_helper.to_array(init[node.input[1]])


def test_plain_int8_misses_and_the_loop_ends_within_tolerance(recovered, sensitive):
    dst, r = recovered
    assert r.rounds[0].excluded == () and r.rounds[0].drop_points > 1.0  # plain INT8 misses
    assert r.success and r.path == str(dst) and r.rounds[-1].drop_points <= 1.0
    assert 1 <= len(r.excluded) == len(r.rounds) - 1 <= 4  # one more node per round, within the budget
    assert r.excluded == r.ranking[:len(r.excluded)]  # most harmful first
    assert r.rounds[1].drop_points < r.rounds[0].drop_points / 3  # the first node kept in FP32 does most of it
    src, _, X, y = sensitive
    assert (1.0 - accuracy(dst, X, y)) * 100 <= 1.0  # the file on disk scores what the record says
    assert accuracy(dst, X, y) == pytest.approx(r.accuracy)


def test_the_node_kept_in_fp32_is_the_broken_layer_and_says_why(recovered):
    dst, r = recovered
    top = r.excluded[0]
    assert top == r.ranking[0] and top.op_type == "MatMul"
    assert np.abs(weight_of(dst, top.node)).max() == pytest.approx(OUTLIER)  # FP32 weights, outlier and all
    assert top.recovered_mse > 10 * max(s.recovered_mse for s in r.ranking[1:])  # far ahead of every other node
    assert top.node in top.why and "recovers" in top.why
    assert json.loads(json.dumps(r.as_dict()))["excluded"][0]["node"] == top.node
    assert [s.recovered_mse for s in r.ranking] == sorted((s.recovered_mse for s in r.ranking), reverse=True)


def test_the_loop_is_deterministic(sensitive, recovered, tmp_path):
    src, calib, X, y = sensitive
    again = accuracy_aware(src, tmp_path / "again.onnx", DYNAMIC, calib, X, y, tolerance_points=1.0, max_excluded=4)
    assert again.ranking == recovered[1].ranking and again.rounds == recovered[1].rounds


@pytest.mark.parametrize(("budget", "reason"), [({"max_excluded": 0}, "max_excluded is 0"),
                                                ({"max_rounds": 0}, "max_rounds 0 reached")])
def test_a_budget_too_small_fails_with_the_reason(sensitive, tmp_path, budget, reason):
    src, calib, X, y = sensitive
    dst = tmp_path / "int8.onnx"
    r = accuracy_aware(src, dst, DYNAMIC, calib, X, y, tolerance_points=1.0, **budget)
    assert not r.success and r.path is None and not dst.exists()
    assert reason in r.reason and "NOT within" in r.summary
    assert r.rounds[-1].drop_points > 1.0


def test_within_tolerance_already_needs_no_ranking(sensitive, tmp_path):
    src, calib, X, y = sensitive
    r = accuracy_aware(src, tmp_path / "int8.onnx", DYNAMIC, calib, X, y, tolerance_points=50.0)
    assert r.success and r.excluded == () and r.ranking == () and len(r.rounds) == 1
    assert (tmp_path / "int8.onnx").is_file()


def test_static_options_rank_on_one_calibration(sensitive, tmp_path):
    """A static option through the same loop (ranges calibrated once, cached across rounds): the broken layer ranks
    first there too."""
    src, calib, X, y = sensitive
    r = accuracy_aware(src, tmp_path / "qdq.onnx", QuantOption("static"), calib, X, y, tolerance_points=0.0,
                       max_excluded=1)
    assert r.ranking and r.ranking[0].op_type == "MatMul" and len(r.rounds) == 2
    assert r.excluded[0] == r.ranking[0]
    assert r.rounds[1].logit_mse < r.rounds[0].logit_mse
