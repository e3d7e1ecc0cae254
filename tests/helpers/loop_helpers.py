"""Production-loop states built cheaply: real DVC-prepared data and a registered champion that is a tiny
hand-made ONNX classifier (one MatMul), so scoring and drift tests need no training run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from mlflow import MlflowClient
from onnx import TensorProto, helper, numpy_helper

from ottimo import vocab
from ottimo.config import load_params
from ottimo.data import versioning
from ottimo.data.tables import materialise_raw
from ottimo.onnx.export import sha256
from ottimo.onnx.measure import INPUT, OUTPUT
from ottimo.registry import promotion, versions
from tests.conftest import REPO
from tests.helpers.reliability_helpers import store


def linear_onnx(path: Path, n_features: int, n_classes: int, seed: int) -> Path:
    """A self-contained ONNX file: logits = X @ W (seeded), the input and output names Ottimo serves."""
    w = np.random.default_rng(seed).normal(size=(n_features, n_classes)).astype("float32")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [INPUT, "W"], [OUTPUT])], "linear",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", n_classes])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def add_onnx_version(client: MlflowClient, exp: str, name: str, folder: Path, revision: str, seed: int) -> str:
    """A registered version (gate passed, sha256 tagged) of a linear ONNX model on the 64 digits features."""
    run = client.create_run(exp, run_name="candidate", tags={"ottimo.kind": "candidate"})
    (folder / run.info.run_id).mkdir(parents=True)
    path = linear_onnx(folder / run.info.run_id / versions.ONNX_FILE, 64, 10, seed)
    client.log_artifact(run.info.run_id, str(path), "model")
    digest = sha256(path)
    mv = versions.register(client, name, f"runs:/{run.info.run_id}/model", run.info.run_id,
                           {vocab.FAMILY: "linear", vocab.SHA256: digest, vocab.GATE_VERDICT: vocab.PASSED,
                            vocab.DATA_REVISION: revision})
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(mv.version)


def loop_project(root: Path, overrides: dict | None = None, versions: int = 1):
    """A project with prepared data under DVC (real `dvc repro prepare`) and `versions` registered versions, the
    last of them champion (the one before it previous-champion): (root, params, client, exp, [versions])."""
    root, params, client, exp = store(root, overrides)
    materialise_raw(root, params.data)
    versioning.ensure_repo(root)
    versioning.track(root, params.data.path)
    versioning.reproduce(root)
    revision = versioning.revision(root)
    name = params.mlflow.registered_model
    made = [add_onnx_version(client, exp, name, root.parent / "models", revision, seed) for seed in range(versions)]
    before = None
    for v in made:
        promotion.promote(client, name, v, before)
        before = v
    return root, load_params(root / "params.yaml"), client, exp, made


def alias_worker(project: Path, op: str, version: str, expected: str, barrier: Path,
                 crash_at: str | None = None) -> subprocess.Popen:
    """`python -m tests.helpers.alias_worker` in its own process: one promote or rollback after `barrier/go` appears."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("OTTIMO_CRASH_AT", None)
    if crash_at:
        env["OTTIMO_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-m", "tests.helpers.alias_worker", str(project), op, version, expected,
                             str(barrier)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


