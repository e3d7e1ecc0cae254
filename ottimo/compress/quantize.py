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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

from ottimo.onnx.export import INPUT, shaped

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


class QuantizeError(ValueError):
    """A quantization option or its inputs are not usable (unknown method, no calibration rows)."""


@dataclass(frozen=True)
class QuantOption:
    """One way to quantize to INT8. `mode` dynamic: weights INT8, activations quantized at run time (the recommended
    one for transformers on CPU); static: QDQ with INT8 activations and weights (S8S8), activation ranges calibrated
    by `calibration` (minmax | entropy | percentile). `per_channel`: one scale per output channel of each weight.
    `reduce_range`: 7-bit weights, for CPUs without VNNI (where the 8-bit product can saturate)."""

    mode: Literal["dynamic", "static"] = "dynamic"
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = False
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if self.mode not in WEIGHT_OPS:
            raise QuantizeError(f"quantization mode {self.mode!r}: use 'dynamic' or 'static'")
        if self.calibration not in CALIBRATION:
            raise QuantizeError(f"calibration {self.calibration!r}: use one of {', '.join(CALIBRATION)}")

    @property
    def name(self) -> str:
        """The candidate-name suffix: int8-dyn, int8-qdq-entropy, ... with -pc (per-channel), -rr (reduce_range)."""
        kind = "dyn" if self.mode == "dynamic" else f"qdq-{self.calibration}"
        return f"int8-{kind}" + ("-pc" if self.per_channel else "") + ("-rr" if self.reduce_range else "")

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "static"

    @classmethod
    def parse(cls, name: str) -> QuantOption:
        """The option a `name` (its suffix, e.g. "int8-qdq-percentile-pc") stands for."""
        parts = name.removeprefix("int8-").split("-")
        flags = {p for p in parts[1:] if p in {"pc", "rr"}}
        rest = [p for p in parts[1:] if p not in flags]
        if parts[0] == "dyn" and not rest:
            option = cls("dynamic", per_channel="pc" in flags, reduce_range="rr" in flags)
        elif parts[0] == "qdq" and len(rest) == 1 and rest[0] in CALIBRATION:
            option = cls("static", rest[0], "pc" in flags, "rr" in flags)
        else:
            raise QuantizeError(f"unknown quantization option {name!r}; names look like "
                                f"{', '.join(o.name for o in OPTIONS)}")
        if option.name != "int8-" + name.removeprefix("int8-"):
            raise QuantizeError(f"quantization option {name!r}: write it as {option.name!r}")
        return option


OPTIONS = (QuantOption("dynamic"), QuantOption("dynamic", per_channel=True),
           QuantOption("dynamic", reduce_range=True),
           QuantOption("static", "minmax"), QuantOption("static", "minmax", per_channel=True),
           QuantOption("static", "entropy"), QuantOption("static", "percentile"))


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


def op_counts(path: Path) -> Counter:
    """How many nodes of each operator type the graph (and its functions) holds."""
    model = onnx.load(str(path))
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return Counter(n.op_type for n in nodes)


def integer_ops(path: Path) -> int:
    return sum(n for op, n in op_counts(path).items() if op in INTEGER_OPS)
