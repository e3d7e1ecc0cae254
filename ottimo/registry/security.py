"""Loading a model to serve or score: no pickle, a verified sha256, no ONNX external data; and the settings
of the optional server authentication.

Every path that loads a registered model (the champion for the gate, a model card, the scoring flow) goes
through `fetch_verified` or `serving_session`, so nothing unverified and nothing unpickled is ever run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnxruntime as ort
from mlflow import MlflowClient
from onnx.external_data_helper import _get_all_tensors, uses_external_data

from ottimo.onnx.export import verify_sha256
from ottimo.onnx.measure import session
from ottimo.registry import versions

NO_PICKLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
PREFECT_SERVER_AUTH, PREFECT_CLIENT_AUTH = "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"
MLFLOW_USER, MLFLOW_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


class UnsafeModelError(RuntimeError):
    """A model file asks for something the serving path never does (external data files)."""


@contextlib.contextmanager
def no_pickle() -> Iterator[None]:
    """MLflow refuses to unpickle anything inside the block (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false)."""
    before = os.environ.get(NO_PICKLE)
    os.environ[NO_PICKLE] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NO_PICKLE, None)
        else:
            os.environ[NO_PICKLE] = before


def refuse_external_data(path: Path) -> Path:
    """Raise UnsafeModelError when the ONNX file points at external data files (a path-traversal vector:
    Ottimo logs its models self-contained, save_as_external_data=False). The file is parsed, not run."""
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in _get_all_tensors(model) if uses_external_data(t)]
    if external:
        raise UnsafeModelError(f"{path}: tensors {external[:5]} live in external data files; Ottimo serves only "
                               "self-contained ONNX files, so it is not loaded")
    return path


def fetch_verified(client: MlflowClient, name: str, ref: str, dst: Path):
    """The ONNX file of `name` version/alias `ref`: downloaded with pickle off, checked against its sha256 tag
    and refused if it uses external data. Returns (path, model version)."""
    with no_pickle():
        path, mv = versions.download_verified(client, name, ref, dst)
    return refuse_external_data(path), mv


def serving_session(path: Path, sha256: str, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime session of a local ONNX file, only after its sha256 matches and it has no external data."""
    return session(refuse_external_data(verify_sha256(path, sha256)), threads)


def auth_env(env: dict[str, str]) -> dict[str, str]:
    """Client settings that follow from the optional server auth in `env`: a Prefect server started with
    PREFECT_SERVER_API_AUTH_STRING is called with the same PREFECT_API_AUTH_STRING."""
    extra = {}
    if env.get(PREFECT_SERVER_AUTH) and not env.get(PREFECT_CLIENT_AUTH):
        extra[PREFECT_CLIENT_AUTH] = env[PREFECT_SERVER_AUTH]
    return extra


def mlflow_auth(env: dict[str, str]) -> bool:
    """MLflow's basic-auth app is on when both MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are set."""
    return bool(env.get(MLFLOW_USER) and env.get(MLFLOW_PASSWORD))
