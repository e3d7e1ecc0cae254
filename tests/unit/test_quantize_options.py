"""Quantization options: each one makes integer ops and a file that runs and mostly agrees with FP32; per-channel,
reduce_range and nodes_to_exclude change what they should; names round-trip; the calibration cache is reused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ottimo.compress.quantize import (
    OPTIONS,
    QuantizeError,
    QuantOption,
    integer_ops,
    op_counts,
    preprocess,
    quantizable_nodes,
    quantize,
    weight_nodes,
)
from ottimo.onnx.measure import predict, scores, session
from tests.helpers.tiny_encoder import export, tokens


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return export(tmp_path_factory.mktemp("quant") / "fp32.onnx")[0]


@pytest.fixture(scope="module")
def made(fp32):
    """Every option's file, made once."""
    calib = tokens(64, seed=2)
    return {o.name: quantize(fp32, fp32.with_name(f"{o.name}.onnx"), o, calib) for o in OPTIONS}


def initializers(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_each_option_makes_integer_ops_that_run_and_agree(fp32, made, option):
    path = made[option.name]
    X = tokens(128, seed=3)
    ref, got = scores(session(fp32), X), scores(session(path), X)
    ops = op_counts(path)
    assert integer_ops(path) > 0
    if option.mode == "dynamic":
        assert ops["MatMulInteger"] >= 4 and ops["DynamicQuantizeLinear"] >= 1
    else:
        assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] >= 4 and "MatMulInteger" not in ops
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert np.abs(got - ref).mean() < 0.1 * np.abs(ref).mean() + 0.05
    assert path.stat().st_size < fp32.stat().st_size


def test_static_s8s8_has_int8_activations_and_weights(made):
    """S8S8: every zero point is int8, but the biases' (int32, as QDQ stores them); none is uint8."""
    dtypes = {a.dtype for n, a in initializers(made["int8-qdq-minmax"]).items()
              if n.endswith("_zero_point") and "bias" not in n}
    assert dtypes == {np.dtype(np.int8)}


def test_per_channel_gives_one_scale_per_output_channel(made):
    def widest_scale(name: str) -> int:
        return max(a.size for n, a in initializers(made[name]).items() if n.endswith("_scale"))

    assert widest_scale("int8-dyn") == 1 and widest_scale("int8-dyn-pc") > 1
    assert widest_scale("int8-qdq-minmax-pc") > 1


def test_reduce_range_uses_seven_bit_weights(made):
    def widest(name: str) -> int:
        return max(int(np.abs(a.astype(int)).max()) for a in initializers(made[name]).values() if a.dtype == np.int8)

    assert widest("int8-dyn") == 127 and widest("int8-dyn-rr") <= 64


def test_calibration_methods_differ(made):
    """entropy / percentile are really used: their activation ranges are not MinMax's."""
    def scales(name: str) -> dict:
        return {n: float(a.ravel()[0]) for n, a in initializers(made[name]).items() if n.endswith("_scale")}

    mm, ent, pct = scales("int8-qdq-minmax"), scales("int8-qdq-entropy"), scales("int8-qdq-percentile")
    assert mm.keys() == ent.keys() == pct.keys()
    assert mm != ent and mm != pct


def test_excluded_nodes_stay_fp32(fp32, tmp_path):
    pre = preprocess(fp32, tmp_path / "pre.onnx", skip_symbolic_shape=True)
    option = QuantOption("dynamic")
    nodes = quantizable_nodes(pre, option)
    full = quantize(pre, tmp_path / "all.onnx", option, pre_process=False)
    part = quantize(pre, tmp_path / "part.onnx", option, nodes_to_exclude=nodes[1:3], pre_process=False)
    kept = {n.name: n.op_type for n in onnx.load(str(part)).graph.node}
    assert all(kept[n] == "MatMul" for n in nodes[1:3])
    assert op_counts(part)["MatMulInteger"] == op_counts(full)["MatMulInteger"] - 2


def test_an_excluded_gemm_stays_fp32_under_its_dynamic_name(fp32, tmp_path):
    pre = preprocess(fp32, tmp_path / "pre.onnx", skip_symbolic_shape=True)
    option = QuantOption("dynamic")
    gemm = next(n for n, op in weight_nodes(pre, option) if op == "Gemm")
    full = quantize(pre, tmp_path / "all.onnx", option, pre_process=False)
    part = quantize(pre, tmp_path / "part.onnx", option, nodes_to_exclude=[gemm], pre_process=False)
    assert {n.name: n.op_type for n in onnx.load(str(part)).graph.node}[gemm] == "MatMul"
    assert op_counts(part)["MatMulInteger"] == op_counts(full)["MatMulInteger"] - 1


def test_quantizable_nodes_are_the_weight_carrying_ones(fp32, tmp_path):
    pre = preprocess(fp32, tmp_path / "pre.onnx", skip_symbolic_shape=True)
    types = {n.name: n.op_type for n in onnx.load(str(pre)).graph.node}
    dyn = quantizable_nodes(pre, QuantOption("dynamic"))
    assert sum(types.get(n) == "Gather" for n in dyn) == 1  # the embedding table, not the QKV split's constant indices
    assert sum(types.get(n) == "MatMul" for n in dyn) == 6  # 2 layers x (QKV, FF1, FF2)
    gemms = [n for n, t in types.items() if t == "Gemm"]  # out-projections and the head, as dynamic names them:
    assert gemms and {f"{g}_MatMul" for g in gemms} <= set(dyn)
    assert "Gemm" in {types[n] for n in quantizable_nodes(pre, QuantOption("static"))}


def test_calibration_cache_is_written_once_and_reused(fp32, tmp_path):
    option, cache = QuantOption("static"), tmp_path / "ranges.json"
    a = quantize(fp32, tmp_path / "a.onnx", option, tokens(32, seed=2), calibration_cache=cache)
    assert cache.is_file()
    b = quantize(fp32, tmp_path / "b.onnx", option, None, calibration_cache=cache)  # no rows: the cache serves
    X = tokens(16)
    assert np.array_equal(predict(session(a), X), predict(session(b), X))


def test_static_without_rows_says_what_to_do(fp32, tmp_path):
    with pytest.raises(QuantizeError, match="pass calib_rows"):
        quantize(fp32, tmp_path / "x.onnx", QuantOption("static", "entropy"), None)


def test_option_names_are_unique_and_round_trip():
    names = [o.name for o in OPTIONS]
    assert len(set(names)) == len(names)
    assert all(QuantOption.parse(n) == o for n, o in zip(names, OPTIONS, strict=True))
    assert QuantOption.parse("dyn-pc") == QuantOption("dynamic", per_channel=True)
    assert QuantOption("static", "percentile", True, True).name == "int8-qdq-percentile-pc-rr"


@pytest.mark.parametrize("bad", ["int8-fp16", "int8-qdq", "int8-dyn-entropy", "int8-qdq-kl", "int8-dyn-rr-pc"])
def test_bad_option_names_are_refused_with_the_known_ones(bad):
    with pytest.raises(QuantizeError, match="int8-"):
        QuantOption.parse(bad)


def test_bad_option_fields_are_refused():
    with pytest.raises(QuantizeError, match="minmax, entropy, percentile"):
        QuantOption("static", "kl")
    with pytest.raises(QuantizeError, match="'dynamic' or 'static'"):
        QuantOption("weights-only")
