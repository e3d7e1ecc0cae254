"""ONNX export with a dynamic batch axis, a parity check against PyTorch, and file hashing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

INPUT, OUTPUT = "features", "logits"


class ExportGuard:
    """Models may train in many threads at once, but an ONNX export runs alone: while torch exports, its
    process-wide "exporting" state makes every optimizer step in any thread write torch.fx's shared metadata
    dict (KeyError 'custom' when two meet), and the exporter (and ORT's quantizer) redirect stdout.
    Wrap training in `training()` and exports in `exclusive()`; never nest one in the other."""

    def __init__(self) -> None:
        self._cond, self._training, self._exporting = threading.Condition(), 0, False

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exporting)
            self._training += 1
        try:
            yield
        finally:
            with self._cond:
                self._training -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exporting and not self._training)
            self._exporting = True
        try:
            yield
        finally:
            with self._cond:
                self._exporting = False
                self._cond.notify_all()


export_guard = ExportGuard()  # one per process: torch's exporting state is process-wide


class ParityError(AssertionError):
    """The ONNX graph does not reproduce the PyTorch logits within tolerance."""


def export_onnx(model: nn.Module, n_features: int, path: Path) -> Path:
    """Export with torch's dynamo exporter; input `features` [batch, n_features] -> `logits` [batch, K]."""
    model.eval()
    example = torch.zeros(2, n_features)
    batch = torch.export.Dim("batch", min=1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter prints its progress
        # torch 2.13's own exporter trips its pytree deprecation (LeafSpec): noise in the user's terminal
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    onnx.checker.check_model(str(path))
    return path


def parity_check(model: nn.Module, path: Path, X: np.ndarray, atol: float) -> float:
    """Max |logits_onnx - logits_torch| over X; raise ParityError above `atol`."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(X)).numpy()
    got = sess.run([OUTPUT], {INPUT: X})[0]
    diff = float(np.abs(got - ref).max())
    if not diff <= atol:
        raise ParityError(f"ONNX logits differ from PyTorch by {diff:.2e} (> {atol:.0e}) on {len(X)} rows")
    return diff


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class IntegrityError(RuntimeError):
    """A model file's sha256 does not match the hash recorded for it."""


def verify_sha256(path: Path, expected: str) -> Path:
    actual = sha256(path)
    if actual != expected:
        raise IntegrityError(
            f"{path}: sha256 {actual[:12]}… does not match the registered {expected[:12]}…; refusing to load it"
        )
    return path
