"""Registry states built cheaply for the promotion and doctor tests: versions of tiny fake ONNX files, no training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from ottimo import vocab
from ottimo.config import load_params
from ottimo.onnx.export import sha256
from ottimo.registry import versions
from ottimo.registry.tracking import connect
from tests.conftest import REPO, write_project

_TEMPLATE: list[Path] = []


def _empty_store(folder: Path) -> Path:
    """A migrated, empty MLflow sqlite file, made once per test session: copying it is faster than migrating."""
    if not _TEMPLATE:
        db = folder / "template.db"
        MlflowClient(f"sqlite:///{db}").search_experiments()  # creates and migrates the tables
        _TEMPLATE.append(db)
    return _TEMPLATE[0]


def store(root: Path, overrides: dict | None = None):
    """A project with its own sqlite MLflow store: (root, params, client, experiment id)."""
    write_project(root, overrides)
    (root / "mlruns").mkdir()
    shutil.copy(_empty_store(root.parent), root / "mlruns" / "mlflow.db")
    params = load_params(root / "params.yaml")
    client, exp = connect(root, params.mlflow)
    return root, params, client, exp


def add_version(client: MlflowClient, exp: str, name: str, tmp: Path, verdict: str | None = "passed",
                with_sha: bool = True, status: str = "FINISHED", tags: dict | None = None,
                start_time: int | None = None) -> str:
    """A registered version backed by a run with a model/model.onnx artifact (random bytes) and its onnx.sha256."""
    run = client.create_run(exp, run_name="candidate", tags={"ottimo.kind": "candidate", **(tags or {})},
                            start_time=start_time)
    folder = tmp / run.info.run_id
    folder.mkdir(parents=True)
    onnx = folder / versions.ONNX_FILE
    onnx.write_bytes(os.urandom(64))
    client.log_artifact(run.info.run_id, str(onnx), "model")
    digest = sha256(onnx)
    client.set_tag(run.info.run_id, "onnx.sha256", digest)
    vtags = {"family": "mlp"} | ({"sha256": digest} if with_sha else {}) | (
        {vocab.GATE_VERDICT: verdict} if verdict else {})
    mv = versions.register(client, name, f"runs:/{run.info.run_id}/model", run.info.run_id, vtags)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return str(mv.version)


def attempt(project: Path, version: str, expected: str | None, barrier: Path, api_url: str,
            crash_at: str | None = None) -> subprocess.Popen:
    """tests/helpers/promote_worker.py in its own process, on the test's Prefect API; it waits for
    `release(barrier)`."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_API_URL=api_url, OMP_NUM_THREADS="1")
    env.pop("OTTIMO_CRASH_AT", None)
    if crash_at:
        env["OTTIMO_CRASH_AT"] = crash_at
    worker = REPO / "tests" / "helpers" / "promote_worker.py"
    return subprocess.Popen([sys.executable, str(worker), str(project), version, expected or "none", str(barrier)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def release(barrier: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Let the attempts go once all of them have opened their runs and are waiting."""
    deadline = time.time() + timeout
    while len(list(barrier.glob("ready-*"))) < len(procs):
        dead = [p.communicate()[0] for p in procs if p.poll() is not None]
        assert not dead, f"a promotion attempt exited before the start: {dead[0][-3000:]}"
        assert time.time() < deadline, "promotion attempts did not start"
        time.sleep(0.05)
    (barrier / "go").touch()
