"""Fixtures: every test gets its own project folder (params, DVC repo and remote, MLflow store)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import yaml

from ottimo.config import deep_merge

REPO = Path(__file__).resolve().parents[1]

os.environ.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
# subprocesses (dvc repro's stage, servers, workers) import this clone's code, not whatever the venv's editable
# install points at (another worktree)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

# Small but real settings: a few epochs, fewer latency runs.
TINY = {
    "train": {"max_epochs": 12, "patience": 4, "log_every": 5},
    # tests that turn tuning on get 3 trials of at most 3 epochs
    "families": {"mlp": {"hparams": {"hidden": [64]}, "space": {"width": [16, 32]}, "trial_epochs": 3},
                 "transformer": {"hparams": {"d_model": 16, "heads": 2, "layers": 1, "ff_dim": 32},
                                 "space": {"d_model": [16], "heads": [2], "layers": {"low": 1, "high": 1}},
                                 "trial_epochs": 3}},
    "evaluate": {"warmup": 5, "runs": 30},
    "tune": {"enabled": False, "n_trials": 3, "n_jobs": 1},  # off for the pipeline tests
    "compress": {"enabled": False},  # off for the older pipeline tests; tests/flows/test_compress.py turns it on
}


def write_project(root: Path, overrides: dict | None = None) -> Path:
    """A project folder: the repo's dvc.yaml and params.yaml with TINY and `overrides` applied."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = deep_merge(deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY), overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_project(tmp_path / "project")


@pytest.fixture(scope="session")
def prefect_db(tmp_path_factory) -> Path:
    """An empty Prefect database with Prefect's schema, made once for the session by Prefect's own CLI (`prefect
    server database upgrade`, about 12 s here). Each harness starts on a copy of it: about 8 s instead of 15 s,
    for a server that would otherwise run the whole chain of migrations again."""
    db = tmp_path_factory.mktemp("prefect-db") / "prefect.db"
    env = os.environ | {"PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}"}
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"], env=env,
                   check=True, capture_output=True, timeout=300)
    return db


@contextmanager
def seeded_harness(prefect_db: Path, timeout: int = 60):
    """Prefect's test harness (a temporary API server on a database of its own) on a copy of `prefect_db`."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL
    from prefect.testing import utilities

    home = Path(tempfile.mkdtemp(prefix="prefect-harness-"))
    shutil.copy(prefect_db, home / "prefect-test.db")  # the file name the harness gives its database
    with mock.patch.object(utilities, "mkdtemp", lambda: str(home)), \
            utilities.prefect_test_harness(server_startup_timeout=timeout):
        url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
        assert url.endswith(str(home / "prefect-test.db")), f"the harness's database is {url}, not the copy"
        yield


@pytest.fixture
def prefect_harness(prefect_db):
    """A fresh Prefect API (a database of its own) for one test."""
    with seeded_harness(prefect_db):
        yield


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster (ottimo.ops.postgres) on a free loopback port, started; stopped and deleted
    afterwards. Needs the server binaries: `make postgres` installs them (`make test-slow` does)."""
    from ottimo.ops.postgres import temporary

    with temporary() as cluster:
        yield cluster
