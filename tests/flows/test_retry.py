"""Transient faults: tasks that talk to MLflow or the DVC remote retry with backoff on transient errors only (a
server gone, 5xx/429, a remote out of reach), never on a failed gate or bad input. The slow test stops the real
MLflow server in the middle of a pipeline run and starts it again."""

from __future__ import annotations

import contextvars
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException

from ottimo import vocab
from ottimo.config import ConfigError, load_params
from ottimo.data import versioning
from ottimo.data.intake import DataValidationError
from ottimo.registry.gate import GateFailed
from ottimo.registry.promotion import ChampionChanged
from tasks.retry import RETRY_TRANSIENT, is_transient
from tests.conftest import seeded_harness, write_project


@pytest.fixture(scope="module")
def harness(prefect_db):
    """One Prefect API for this module's quick flow tests (starting one costs ~8 s here); each has its own project."""
    with seeded_harness(prefect_db):
        yield


def _caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


TRANSIENT = [
    ConnectionRefusedError(111, "Connection refused"),
    requests.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded"),
    requests.Timeout("read timed out"),
    MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed with exception "
                    "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url"),
    MlflowException("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 503 != 200. "
                    "Response body: 'unavailable'"),
    RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "try later"}),
    RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "429"}),
    versioning.RemoteUnavailable("`dvc push` failed: [Errno 20] Not a directory"),
    _caused(RuntimeError("wrapped"), ConnectionResetError()),
]
PERMANENT = [
    GateFailed("gate failed for every candidate"),
    DataValidationError("column 'target' is missing"),
    ConfigError("train.max_epochs must be > 0"),
    ChampionChanged("champion moved"),
    _caused(GateFailed("gate failed"), ConnectionError()),  # never retried, whatever caused it
    RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such run"}),
    RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}),
    MlflowException("Registered model 'x' not found"),
    versioning.DvcError("`dvc add` failed: bad path"),
    ValueError("bad value"),
    None,
]


def test_only_transient_errors_are_retryable():
    assert [is_transient(e) for e in TRANSIENT] == [True] * len(TRANSIENT)
    assert [is_transient(e) for e in PERMANENT] == [False] * len(PERMANENT)


def _task_runs(state) -> dict[str, list]:
    """name -> task runs of the flow run behind `state`, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
            state.state_details.flow_run_id])), sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.name.rsplit("-", 1)[0], []).append(r)
    return out


def test_the_policy_retries_a_dropped_connection_but_not_a_failed_gate_or_bad_input(harness):
    from prefect import flow, task

    calls: dict[str, int] = {}
    fast = {**RETRY_TRANSIENT, "retry_delay_seconds": 0, "retry_jitter_factor": None}

    @task(**fast)
    def flaky(kind: str, failures: int) -> str:
        calls[kind] = calls.get(kind, 0) + 1
        if calls[kind] <= failures:
            raise {"connection": ConnectionRefusedError(111, "Connection refused"), "gate": GateFailed("gate failed"),
                   "data": DataValidationError("column 'target' is missing")}[kind]
        return "ok"

    @flow
    def probe(kind: str, failures: int) -> str:
        return flaky(kind, failures)

    assert probe("connection", 2) == "ok" and calls["connection"] == 3  # two refusals, then through
    assert probe("connection", 9, return_state=True).is_failed() and calls["connection"] == 3 + 4  # gave up
    for kind, err in (("gate", GateFailed), ("data", DataValidationError)):
        with pytest.raises(err):
            probe(kind, 1)
        assert calls[kind] == 1, f"{kind}: retried"


def test_the_real_gate_task_fails_once_without_retrying(tmp_path, harness):
    from prefect import flow

    from tasks.evaluate import Evaluated
    from tasks.registry import gate
    from tests.helpers.reliability_helpers import add_version, store

    root, params, client, exp = store(tmp_path / "project", {"gate": {"min_accuracy": 0.99}})
    name = params.mlflow.registered_model
    version = add_version(client, exp, name, tmp_path / "v", verdict="pending", status="RUNNING")
    mv = client.get_model_version(name, version)
    parent = client.create_run(exp, run_name="pipeline", tags={"ottimo.kind": "pipeline"}).info.run_id
    cand = Evaluated("mlp", mv.run_id, f"runs:/{mv.run_id}/model", mv.tags["sha256"], 10,
                     {"accuracy": 0.5, "macro_f1": 0.5, "p50_ms": 0.1, "p95_ms": 0.1, "throughput_rps": 1e4,
                      "size_mb": 0.01})

    @flow
    def gated() -> object:
        return gate(root, params, parent, [cand], [version], None)

    state = gated(return_state=True)
    assert state.is_failed() and "gate failed" in state.message
    (run,) = _task_runs(state)["gate"]
    assert run.run_count == 1 and run.state.is_failed()  # ran once: a failed gate is never retried
    assert vocab.tag(client.get_model_version(name, version).tags, vocab.GATE_VERDICT) == "failed"


def test_loading_the_champion_for_scoring_retries_a_dropped_download_only(tmp_path, harness, monkeypatch):
    from prefect import flow

    import tasks.score
    from ottimo.onnx.export import IntegrityError
    from ottimo.registry.security import UnsafeModelError
    from tests.helpers.reliability_helpers import add_version, store

    root, params, client, exp = store(tmp_path / "project")
    name = params.mlflow.registered_model
    client.set_registered_model_alias(name, "champion", add_version(client, exp, name, tmp_path / "v"))
    calls: list[str] = []

    def fetch(*args, **kwargs):
        calls.append(kind)
        raise errors[kind]

    errors = {"connection": ConnectionRefusedError(111, "Connection refused"), "unsafe": UnsafeModelError("external"),
              "tampered": IntegrityError("sha256 mismatch"), "data": DataValidationError("bad schema.json"),
              "config": ConfigError("bad params")}
    monkeypatch.setattr(tasks.score, "fetch_verified", fetch)
    fast = tasks.score.load_champion.with_options(retry_delay_seconds=0, retry_jitter_factor=None)

    @flow
    def loading() -> object:
        return fast(root, params)

    for kind, err in errors.items():
        state = loading(return_state=True)
        assert state.is_failed() and isinstance(state.result(raise_on_failure=False), type(err))
        (run,) = _task_runs(state)["load_champion"]
        expected = 1 + RETRY_TRANSIENT["retries"] if kind == "connection" else 1  # only the dropped one retried
        assert calls.count(kind) == expected and run.run_count == expected, f"{kind}: {calls.count(kind)} attempts"


def _restore_after_a_failed_push(remote: Path, timeout: float = 120) -> None:
    """Bring the remote back once Prefect has recorded a failed push_data attempt that awaits its retry."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateName
    from prefect.client.schemas.sorting import TaskRunSort

    wanted = TaskRunFilter(state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["AwaitingRetry", "Retrying"])))
    deadline = time.time() + timeout
    try:
        with get_client(sync_client=True) as client:
            while time.time() < deadline and not [r for r in client.read_task_runs(
                    task_run_filter=wanted, sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=10)
                    if r.name.startswith("push_data")]:
                time.sleep(0.1)
    finally:
        remote.unlink()


def test_push_data_retries_until_the_dvc_remote_is_back(tmp_path, harness):
    from prefect import flow

    from tasks.data import prepare_data, push_data, validate_raw

    root = write_project(tmp_path / "project", {"dvc": {"remote_url": str(tmp_path / "remote")}})
    params = load_params(root / "params.yaml")
    remote = tmp_path / "remote"

    @flow
    def prepared() -> None:
        validate_raw(root, params)
        prepare_data(root, params)

    @flow
    def pushed() -> str:
        return push_data.with_options(retry_delay_seconds=[1, 2, 4], retry_jitter_factor=None)(root, params)

    prepared()
    remote.write_text("the remote is out of reach")  # a file where the remote folder should be: every write fails
    back = threading.Thread(target=contextvars.copy_context().run, args=(_restore_after_a_failed_push, remote),
                            daemon=True)  # ... for a while (the thread sees the test's Prefect API)
    back.start()
    try:
        state = pushed(return_state=True)
    finally:
        back.join()
    assert state.is_completed(), state.message
    (run,) = _task_runs(state)["push_data"]
    assert run.run_count >= 2  # the first push failed while the remote was gone, a retry made it
    assert versioning.status_cloud(root) == {}  # `dvc status -c`: cache and remote agree
    assert any(remote.rglob("*")), "nothing reached the remote"


# --- the real MLflow server stopped and started again in the middle of a pipeline run ------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_survives_the_mlflow_server_going_away_mid_run(tmp_path, prefect_harness, monkeypatch):
    from mlflow import MlflowClient

    from flows.pipeline import training_pipeline
    from ottimo.ops import servers
    from ottimo.ops.postgres import free_port
    from ottimo.registry import versions

    root = write_project(tmp_path / "project", {"deploy": {"mlflow_port": free_port()},
                                                "train": {"candidates": ["mlp"], "max_epochs": 12}})
    params = load_params(root / "params.yaml")
    outage: dict[str, float] = {}
    try:
        ep = servers.up(root, timeout=180, names=("mlflow",))
        monkeypatch.setenv("OTTIMO_TRACKING_URI", ep.mlflow_ui)
        watcher = MlflowClient(ep.mlflow_ui)

        def outage_while_training() -> None:
            """Stop the server once a candidate is training, start it again 3 s later."""
            deadline = time.time() + 300
            while time.time() < deadline:
                exps = watcher.search_experiments()
                if exps and watcher.search_runs([e.experiment_id for e in exps], "tags.`ottimo.kind` = 'candidate'"):
                    break
                time.sleep(0.2)
            outage["down"] = time.time()
            servers.down(root)
            time.sleep(3)
            servers.up(root, timeout=180, names=("mlflow",))
            outage["up"] = time.time()

        thread = threading.Thread(target=outage_while_training, daemon=True)
        thread.start()
        state = training_pipeline(project_dir=str(root), return_state=True)
        finished = time.time()
        thread.join(timeout=200)
        assert state.is_completed(), state.message
        assert outage.get("down") and outage["up"] < finished  # the server really went away mid-run and came back
        client = MlflowClient(ep.mlflow_ui)
        exp = client.get_experiment_by_name(params.mlflow.experiment).experiment_id
        runs = client.search_runs([exp])
        assert [r.data.tags["ottimo.kind"] for r in runs if r.data.tags.get("ottimo.kind") == "pipeline"] == [
            "pipeline"]  # one pipeline run: nothing was started twice
        assert not [r for r in runs if r.info.status == "RUNNING"]
        found = client.search_model_versions(f"name = '{params.mlflow.registered_model}'")
        assert len(found) == 1 and vocab.tag(found[0].tags, vocab.GATE_VERDICT) == "passed"
        assert versions.aliases(client, params.mlflow.registered_model)["champion"] == found[0].version
    finally:
        servers.down(root)
        shutil.rmtree(root / ".run", ignore_errors=True)
