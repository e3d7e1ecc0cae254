"""Where MLflow lives: the embedded SQLite store under mlruns/ unless OTTIMO_TRACKING_URI says otherwise.

Not MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() writes that variable itself, so it would carry one
project's store into the next project opened by the same process.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import get_args

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from ottimo import vocab
from ottimo.config import CardFigure, MlflowCfg, Params
from ottimo.registry import sqlite_store

SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)[^/@\s]+@")  # user:password@ in a URL
EXTRA_KEYS = {"family", "technique", "base", "method", "amount", "format",  # logged beside the config (train, compress)
              "option", "mode", "calibration", "per_channel", "reduce_range"}  # a quantization option


@cache
def allowed_keys() -> frozenset[str]:
    """Every name a logged param's dotted key may be made of: the fields of the params.yaml schema (all
    sections, nested), the model-card figure names, and EXTRA_KEYS. Anything else is never logged."""
    names = set(EXTRA_KEYS)
    for figure in get_args(CardFigure):
        names |= set(figure.split("."))

    def walk(model: type) -> None:
        for name, info in model.model_fields.items():
            names.add(name)
            for arg in (info.annotation, *get_args(info.annotation)):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    walk(arg)
                for inner in get_args(arg):
                    if isinstance(inner, type) and hasattr(inner, "model_fields"):
                        walk(inner)

    walk(Params)
    return frozenset(names)


def redact(value: str) -> str:
    """A value with the user:password part of any URL in it replaced by ***."""
    return CREDENTIALS.sub(r"\g<scheme>***@", value)


def in_project(root: Path, url: str) -> str:
    """A `sqlite:///relative/path` URL made absolute against the project root (its folder created);
    any other URL as it is."""
    prefix = sqlite_store.PREFIX
    if url.startswith(prefix) and not os.path.isabs(url[len(prefix):]):
        db = (root / url[len(prefix):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        url = prefix + str(db)
    return url


def work_dir(root: Path, run_id: str) -> Path:
    """A run's scratch folder under the project's mlruns/ (exported files before they are logged), created."""
    path = root / "mlruns" / "work" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri(root: Path, cfg: MlflowCfg) -> str:
    """OTTIMO_TRACKING_URI wins (e.g. a server); a relative sqlite path is taken from the project root."""
    return in_project(root, os.environ.get("OTTIMO_TRACKING_URI") or cfg.tracking_uri)


def connect(root: Path, cfg: MlflowCfg) -> tuple[MlflowClient, str]:
    """Point MLflow at the project's store (a new SQLite one seeded from the empty template, sqlite_store); return
    a client and the experiment id (created if needed), looked up once per process and store: every task
    connects, and on a server each lookup is a round trip."""
    uri = sqlite_store.seed_uri(tracking_uri(root, cfg))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    if (uri, cfg.experiment) not in _EXPERIMENTS:
        _EXPERIMENTS[uri, cfg.experiment] = _experiment(root, client, uri, cfg.experiment)
    return client, _EXPERIMENTS[uri, cfg.experiment]


_EXPERIMENTS: dict[tuple[str, str], str] = {}  # (tracking URI, experiment name) -> id


def _experiment(root: Path, client: MlflowClient, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if vocab.EXPERIMENT_KIND not in exp.tags:  # made before Ottimo set it: opened in the GenAI view
            client.set_experiment_tag(exp.experiment_id, vocab.EXPERIMENT_KIND, vocab.CLASSIC_ML)
        return exp.experiment_id
    artifacts = (root / "mlruns" / "artifacts").resolve().as_uri() if uri.startswith(sqlite_store.PREFIX) else None
    return client.create_experiment(name, artifact_location=artifacts, tags={vocab.EXPERIMENT_KIND: vocab.CLASSIC_ML})


def set_run_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    """Several tags on a run in one request (log_batch), not one set_tag each."""
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def stamped(values: Mapping[str, float], step: int = 0, now: int | None = None) -> list[Metric]:
    """`values` as MLflow metrics at `step` for one log_batch, all stamped with one clock reading (`now`, ms since
    the epoch, when given): MLflow's UI charts metrics against that wall time."""
    now = int(time.time() * 1000) if now is None else now
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def new_logged_model(client: MlflowClient, run_id: str, name: str, tags: dict[str, str] | None = None) -> str:
    """A logged model (PENDING) in the run's own experiment, named for what it is; pass its id to
    `mlflow.<flavor>.log_model(model_id=...)`. Left to log_model, the model would land in the process's current
    experiment (Default), not the run's, and the run's page would show "Logged models (0)"."""
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=vocab.model_name(name), source_run_id=run_id,
                                       tags={k: vocab.clip(v) for k, v in (tags or {}).items()},
                                       params=dict(run.data.params), model_type="onnx-classifier")
    return model.model_id


def run_model_uri(client: MlflowClient, run_id: str) -> str:
    """The `models:/m-<id>` URI of the newest model logged by a run (what a registry version points at)."""
    outputs = client.get_run(run_id).outputs
    models = outputs.model_outputs if outputs else []
    if not models:
        raise LookupError(f"run {run_id} logged no model")
    return f"models:/{models[-1].model_id}"


OPEN_KEYS = frozenset({"families", "hparams", "space"})  # their keys are the user's names (families, builder args)


def flatten(d: dict, prefix: str = "", open_: bool = False) -> dict[str, str]:
    """Nested params as flat `a.b.c` keys for MLflow, through an allow-list: only keys made of known config
    names (allowed_keys), or the user's names directly under OPEN_KEYS (a family, a builder's argument), and not
    looking like a secret; credentials in URL values are redacted."""
    out: dict[str, str] = {}
    allowed = allowed_keys()
    for k, v in d.items():
        key = f"{prefix}{k}"
        if SECRET.search(key) or not (open_ or set(str(k).split(".")) <= allowed):
            continue
        if isinstance(v, dict):
            out |= flatten(v, key + ".", str(k) in OPEN_KEYS)
        else:
            out[key] = vocab.clip(redact(str(v)), vocab.PARAM_LIMIT)
    return out
