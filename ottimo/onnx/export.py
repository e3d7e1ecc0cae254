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

from ottimo.spec import InputSpec

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


def shaped(sess: ort.InferenceSession, X: np.ndarray) -> np.ndarray:
    """Rows as the session's input takes them: flat feature rows (N, C*H*W) reshaped to its [batch, C, H, W] (or
    any fixed shape), cast to its dtype (token ids: int64). Every caller that runs a model file feeds it this way,
    so tables, batches and served rows stay flat columns whatever the model's input."""
    inp = sess.get_inputs()[0]
    dims = inp.shape[1:]
    dtype = np.int64 if inp.type == "tensor(int64)" else np.float32
    X = np.asarray(X)
    if X.ndim == 2 and len(dims) > 1 and all(isinstance(d, int) for d in dims):
        X = X.reshape(len(X), *dims)
    return np.ascontiguousarray(X, dtype=dtype)


def export_onnx(model: nn.Module, spec: InputSpec, path: Path) -> Path:
    """Export with torch's dynamo exporter; input `features` [batch, *spec.shape] (spec.dtype) -> `logits`
    [batch, K]; the batch axis is dynamic."""
    model.eval()
    example = torch.ones(2, *spec.shape, dtype=getattr(torch, spec.dtype))  # id 1: a real token, not the padding
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
        ref = model.eval()(torch.from_numpy(shaped(sess, X))).numpy()
    got = sess.run([OUTPUT], {INPUT: shaped(sess, X)})[0]
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
