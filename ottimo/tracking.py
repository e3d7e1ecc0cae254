"""Where MLflow lives: the embedded SQLite store under mlruns/ unless OTTIMO_TRACKING_URI says otherwise.

Not MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() writes that variable itself, so it would carry one
project's store into the next project opened by the same process.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from ottimo.config import MlflowCfg

SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def in_project(root: Path, url: str) -> str:
    """A `sqlite:///relative/path` URL made absolute against the project root (its folder created);
    any other URL as it is."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not os.path.isabs(url[len(prefix):]):
        db = (root / url[len(prefix):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        url = prefix + str(db)
    return url


def tracking_uri(root: Path, cfg: MlflowCfg) -> str:
    """OTTIMO_TRACKING_URI wins (e.g. a server); a relative sqlite path is taken from the project root."""
    return in_project(root, os.environ.get("OTTIMO_TRACKING_URI") or cfg.tracking_uri)


def connect(root: Path, cfg: MlflowCfg) -> tuple[MlflowClient, str]:
    """Point MLflow at the project's store; return a client and the experiment id (created if needed)."""
    uri = tracking_uri(root, cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return client, exp.experiment_id
    artifacts = (root / "mlruns" / "artifacts").resolve().as_uri() if uri.startswith("sqlite") else None
    return client, client.create_experiment(cfg.experiment, artifact_location=artifacts)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as flat `a.b.c` keys, with any key that looks like a secret left out."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if SECRET.search(key):
            continue
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = str(v)[:6000]
    return out
