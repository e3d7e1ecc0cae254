"""The names of the INT8 quantization options (`compress.quantize.options`): what each one is, parsed and
validated without onnxruntime, so the params schema can check them (ottimo.compress.quantize makes them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MODES = ("dynamic", "static")
CALIBRATIONS = ("minmax", "entropy", "percentile")  # static options' activation-range methods


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
        if self.mode not in MODES:
            raise QuantizeError(f"quantization mode {self.mode!r}: use 'dynamic' or 'static'")
        if self.calibration not in CALIBRATIONS:
            raise QuantizeError(f"calibration {self.calibration!r}: use one of {', '.join(CALIBRATIONS)}")

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
        elif parts[0] == "qdq" and len(rest) == 1 and rest[0] in CALIBRATIONS:
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
