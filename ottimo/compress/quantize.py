"""Post-training quantization of ONNX files with onnxruntime.quantization (INT8 dynamic, INT8 static QDQ), and
the operator census the tests and report use.

`QuantOption` names one way to quantize (dynamic, or static QDQ S8S8 with a calibration method; per-channel;
reduce_range) and the suffix its candidate carries; `quantize(src, dst, option, calib_rows, nodes_to_exclude)` makes
it. `OPTIONS` is the set worth measuring on x86. `quantizable_nodes` (`weight_nodes`, with op types) lists the
weight-carrying nodes an option quantizes, by the names `nodes_to_exclude` takes (ottimo.compress.sensitivity
keeps the most harmful in FP32).

No FP16: onnxruntime.transformers.float16 converts the dynamo-exported graphs, but onnxruntime 1.32's CPU
provider crashes (segfault) running the result, and onnxconverter-common is not a dependency."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from ottimo.compress.options import OPTIONS, QuantizeError, QuantOption  # noqa: F401  (re-exported)
from ottimo.data.tables import Splits
from ottimo.onnx.export import INPUT, shaped
from ottimo.onnx.measure import predict, session

INTEGER_OPS = {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
               "DynamicQuantizeMatMul", "QGemm", "QAttention", "MatMulIntegerToFloat", "ConvInteger", "QLinearConv"}
CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
# quantize_static hands the calibrator no bin counts, and with its defaults (128 bins, 128 quantized bins) entropy
# has one candidate threshold, the full range: it equals MinMax. `calibrate` asks for a finer histogram: 256 bins
# (64 candidate thresholds per tensor); 2048 took 90 s on a 2-layer d_model-64 encoder (the threshold search is a
# Python loop per tensor), 256 takes 5 s.
CALIBRATOR_OPTIONS = {"minmax": {}, "entropy": {"num_bins": 256, "num_quantized_bins": 128},
                      "percentile": {"num_bins": 2048, "percentile": 99.999}}
# weight-carrying ops each mode quantizes (onnxruntime.quantization.registry); what sensitivity ranks
WEIGHT_OPS = {"dynamic": ("MatMul", "Gemm", "Attention", "Conv", "Gather", "EmbedLayerNormalization", "LSTM"),
              "static": ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")}


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


def preprocess(src: Path, dst: Path, skip_symbolic_shape: bool = False) -> Path:
    """quant_pre_process: (symbolic) shape inference and onnxruntime's basic graph optimisation, as the quantizer
    recommends. `quantize` starts from it; its node names are the ones `nodes_to_exclude` takes."""
    with _quiet():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic_shape)
    return dst


def quantize(src: Path, dst: Path, option: QuantOption, calib_rows: np.ndarray | None = None,
             nodes_to_exclude: Sequence[str] = (), *, pre_process: bool = True,
             skip_symbolic_shape: bool = True, calibration_cache: Path | None = None) -> Path:
    """`src` quantized as `option` says into `dst`. Static options calibrate on `calib_rows` (a sample of the train
    split, flat or shaped: fed through `shaped`). Nodes named in `nodes_to_exclude` stay FP32; name them as the
    graph that is quantized has them: `preprocess(src, ...)`'s, or src's own with `pre_process=False`.
    `pre_process` runs quant_pre_process first (`skip_symbolic_shape` True, as the issue's calibration point did: on
    the dynamo-exported transformer both settings give the same graph and a tied p50, and skipping cannot fail on
    shapes the symbolic inference does not know). `calibration_cache` (static
    options): a JSON file of activation ranges, written on first use and read after (calib_rows may then be None),
    so re-quantizing the same graph with other nodes excluded skips calibration."""
    cached = calibration_cache is not None and Path(calibration_cache).is_file()
    if option.needs_calibration and not cached and (calib_rows is None or len(calib_rows) == 0):
        raise QuantizeError(f"{option.name} calibrates activation ranges: pass calib_rows (a sample of train rows)")
    base = preprocess(src, dst.with_suffix(".pre.onnx"), skip_symbolic_shape) if pre_process else Path(src)
    try:
        with _quiet():
            _run(base, dst, option, calib_rows, list(nodes_to_exclude), calibration_cache)
    finally:
        if pre_process:
            base.unlink(missing_ok=True)
    return dst


def _run(src: Path, dst: Path, option: QuantOption, calib_rows: np.ndarray | None, exclude: list[str],
         cache: Path | None) -> None:
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}  # fused (com.microsoft) outputs lack inferred types
    if option.mode == "dynamic":
        quantize_dynamic(str(src), str(dst), per_channel=option.per_channel, reduce_range=option.reduce_range,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude, extra_options=extra)
        return
    with tempfile.TemporaryDirectory(prefix="ottimo-calib-") as tmp:
        cache = Path(cache) if cache is not None else Path(tmp) / "ranges.json"
        if not cache.is_file():
            calibrate(src, calib_rows, option.calibration, cache)
        quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=option.per_channel,
                        reduce_range=option.reduce_range, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        calibrate_method=CALIBRATION[option.calibration], extra_options=extra,
                        calibration_cache_path=str(cache))


def calibrate(src: Path, calib_rows: np.ndarray, method: str, cache: Path) -> Path:
    """Activation ranges of `src` on `calib_rows` by `method` (minmax | entropy | percentile, CALIBRATOR_OPTIONS),
    written to `cache`, the JSON quantize_static reads as its calibration_cache_path."""
    X = shaped(ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]), calib_rows)
    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # what quantize_static calibrates by default
    with tempfile.TemporaryDirectory(prefix="ottimo-calib-") as tmp, _quiet():
        calibrator = create_calibrator(Path(src), ops, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CALIBRATION[method],
                                       extra_options=dict(CALIBRATOR_OPTIONS[method]))
        calibrator.collect_data(RowsReader(X))
        save_tensors_data(calibrator.compute_data(), cache)
    return cache


def weight_nodes(path: Path, option: QuantOption) -> list[tuple[str, str]]:
    """(name, op type) of each node in `path` that `option` would quantize and whose weight is a constant (MatMul,
    Gemm, Conv, Attention: the second input; Gather: the table, not constant indices), in graph order. The name is
    the one `nodes_to_exclude` takes: dynamic quantization first rewrites each Gemm G as a MatMul named G_MatMul
    (onnxruntime's replace_gemm_with_matmul), so that is its name there."""
    model = onnx.load(str(path))
    consts = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
    ops = WEIGHT_OPS[option.mode]

    def weight(n: onnx.NodeProto) -> str:
        at = 0 if n.op_type == "Gather" else 1
        return n.input[at] if len(n.input) > at else ""

    def name(n: onnx.NodeProto) -> str:
        return f"{n.name}_MatMul" if option.mode == "dynamic" and n.op_type == "Gemm" else n.name

    return [(name(n), n.op_type) for n in model.graph.node if n.op_type in ops and weight(n) in consts]


def quantizable_nodes(path: Path, option: QuantOption) -> list[str]:
    """The names of `weight_nodes`: what can stay FP32 through `nodes_to_exclude`."""
    return [name for name, _ in weight_nodes(path, option)]


def calibration_sample(splits: Splits, n: int, seed: int) -> np.ndarray:
    """The seeded sample of `n` train rows (at most all of them) static options calibrate on, shaped as the model
    takes them."""
    rng = np.random.default_rng(seed)
    return splits.rows(splits.X_train[rng.choice(len(splits.X_train), min(n, len(splits.X_train)), replace=False)])


def agreement(path: Path, src: Path, X: np.ndarray) -> float:
    """The share of rows of X on which the quantized file at `path` predicts the class its FP32 `src` does."""
    return float((predict(session(path), X) == predict(session(src), X)).mean())


def disagreement(share: float, min_agreement: float) -> str | None:
    """Why a quantized file whose predictions agree with its FP32 source's on `share` of the test rows is
    disqualified (fewer than `min_agreement`, compress.quantize.min_agreement), or None."""
    return None if share >= min_agreement else (
        f"predictions agree with the FP32 model on {share:.1%} of test rows (< min_agreement {min_agreement:.1%})")


def op_counts(path: Path) -> Counter:
    """How many nodes of each operator type the graph (and its functions) holds."""
    model = onnx.load(str(path))
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return Counter(n.op_type for n in nodes)


def integer_ops(path: Path) -> int:
    return sum(n for op, n in op_counts(path).items() if op in INTEGER_OPS)
