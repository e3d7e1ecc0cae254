"""Post-training quantization of ONNX files with onnxruntime.quantization (INT8 dynamic, INT8 static QDQ), and
the operator census the tests and report use.

No FP16: onnxruntime.transformers.float16 converts the dynamo-exported graphs, but onnxruntime 1.32's CPU
provider crashes (segfault) running the result, and onnxconverter-common is not a dependency."""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from ottimo.onnx.export import INPUT

INTEGER_OPS = {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
               "DynamicQuantizeMatMul", "QGemm", "QAttention", "MatMulIntegerToFloat"}


class RowsReader(CalibrationDataReader):
    """Feeds calibration rows one batch at a time to the static quantizer's calibrator."""

    def __init__(self, X: np.ndarray, batch: int = 32):
        self._batches = iter([{INPUT: X[i : i + batch]} for i in range(0, len(X), batch)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs advice at WARNING and prints; keep the task log readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def preprocess(src: Path, dst: Path) -> Path:
    """quant_pre_process: symbolic shape inference and graph optimisation, as the quantizer recommends."""
    with _quiet():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    return dst


def dynamic_int8(src: Path, dst: Path, per_channel: bool = False, reduce_range: bool = False) -> Path:
    """INT8 weights, activations quantized at run time (MatMulInteger / DynamicQuantizeLinear)."""
    pre = preprocess(src, dst.with_suffix(".pre.onnx"))
    with _quiet():
        quantize_dynamic(str(pre), str(dst), per_channel=per_channel, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8)
    pre.unlink()
    return dst


def static_int8(src: Path, dst: Path, X_calib: np.ndarray, per_channel: bool = False,
                reduce_range: bool = False) -> Path:
    """INT8 in QDQ format with activation ranges calibrated (MinMax) on `X_calib`, a sample of the train split shaped
    as the model takes it (ottimo.onnx.export.shaped)."""
    pre = preprocess(src, dst.with_suffix(".pre.onnx"))
    with _quiet():
        quantize_static(str(pre), str(dst), RowsReader(X_calib), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)
    pre.unlink()
    return dst


def op_counts(path: Path) -> Counter:
    """How many nodes of each operator type the graph (and its functions) holds."""
    model = onnx.load(str(path))
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return Counter(n.op_type for n in nodes)


def integer_ops(path: Path) -> int:
    return sum(n for op, n in op_counts(path).items() if op in INTEGER_OPS)
