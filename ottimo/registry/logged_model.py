"""An ONNX file logged as its run's MLflow model: the one place a model is logged (evaluate and compress)."""

from __future__ import annotations

import json
import warnings
from functools import cache
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.models import infer_signature

from ottimo import vocab
from ottimo.onnx.export import INPUT, sha256, shaped
from ottimo.onnx.measure import session
from ottimo.onnx.metadata import write_classes
from ottimo.registry.tracking import new_logged_model, set_run_tags


@cache
def onnx_requirements() -> tuple[str, ...]:
    """The pip requirements MLflow's own inference finds for an ONNX model here: the flavor's (onnx, onnxruntime)
    and numpy, pinned to this environment; log_model puts mlflow first. Given explicitly, log_model skips that
    inference, which loads the model in a fresh interpreter (1.5 to 3 s a model, on every model logged);
    tests/unit/test_overhead.py checks that both agree."""
    return tuple(sorted({*mlflow.onnx.get_default_pip_requirements(), f"numpy=={version('numpy')}"}))


def log_onnx_model(client: MlflowClient, run_id: str, path: Path, X: np.ndarray, name: str,
                   tags: dict[str, str], classes: list | None = None) -> tuple[str, str]:
    """Log the ONNX file as run `run_id`'s MLflow model, in the run's own experiment as a logged model named
    `name` (a family, a candidate) with `tags`, its signature and input example from the first two rows of X, and
    tag the run with the file's sha256 (onnx.sha256); return (model URI, sha256). `classes` (the data revision's
    class list, output i = classes[i]) is first written into the file's metadata (ottimo.onnx.metadata), so the
    sha256 covers it, and tagged on the run and the logged model (data.classes)."""
    if classes is not None:
        write_classes(path, classes)
        tags = tags | {vocab.CLASSES: vocab.clip(json.dumps(list(classes), ensure_ascii=False))}
    example = shaped(session(path), X[:2])
    model_id = new_logged_model(client, run_id, name, tags)
    with warnings.catch_warnings():  # MLflow's schema hints (integer columns) would reach the user's terminal
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")
        info = mlflow.onnx.log_model(
            onnx.load(str(path)), name=vocab.model_name(name), model_id=model_id, run_id=run_id,
            save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"], input_example=example,
            pip_requirements=list(onnx_requirements()),
            signature=infer_signature(example, session(path).run(None, {INPUT: example})[0]))
    digest = sha256(path)
    run_tags = {"onnx.sha256": digest} | ({vocab.CLASSES: tags[vocab.CLASSES]} if classes is not None else {})
    set_run_tags(client, run_id, run_tags)
    return info.model_uri, digest
