"""Round trips to an MLflow server: every task connects, so what is asked once per process must not be asked again,
and tags set together go in one request. Counted on a real server: requests' own session, observed, not replaced."""

from __future__ import annotations

import urllib.parse

import pytest
import requests

from ottimo.config import MlflowCfg
from ottimo.ops import servers
from ottimo.ops.postgres import free_port
from ottimo.registry.tracking import connect, set_run_tags
from tests.conftest import write_project


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    root = write_project(tmp_path / "project", {"deploy": {"prefect_port": free_port(), "mlflow_port": free_port()}})
    try:
        ep = servers.up(root, timeout=120, names=("mlflow",))
        monkeypatch.setenv("OTTIMO_TRACKING_URI", ep.mlflow_ui)
        yield root
    finally:
        servers.down(root)


@pytest.fixture
def sent(monkeypatch) -> list[str]:
    """'METHOD /path' of every request made through requests from here on (the real call is made)."""
    seen: list[str] = []
    real = requests.Session.request

    def observed(self, method, url, *args, **kwargs):
        seen.append(f"{method} {urllib.parse.urlparse(url).path}")
        return real(self, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", observed)
    return seen


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_process_asks_a_server_for_its_experiment_once_and_sends_tags_in_one_request(mlflow_server, sent):
    lookups = "GET /api/2.0/mlflow/experiments/get-by-name"
    first = [connect(mlflow_server, MlflowCfg(experiment="round-trips")) for _ in range(3)]
    assert len({exp for _, exp in first}) == 1
    assert sent.count(lookups) == 1 and sent.count("POST /api/2.0/mlflow/experiments/create") == 1, sent
    client, other = connect(mlflow_server, MlflowCfg(experiment="another"))  # another name: asked for
    assert other != first[0][1] and sent.count(lookups) == 2
    assert client.get_experiment(first[0][1]).name == "round-trips"  # the remembered id is the server's

    run_id = client.create_run(first[0][1]).info.run_id
    del sent[:]
    tags = {"a": "1", "b": "two", "c": "ünïcode"}
    set_run_tags(client, run_id, tags)
    assert sent == ["POST /api/2.0/mlflow/runs/log-batch"]
    assert {k: v for k, v in client.get_run(run_id).data.tags.items() if k in tags} == tags
