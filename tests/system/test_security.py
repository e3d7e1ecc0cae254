"""Security by default: loopback servers with optional auth, nothing unverified or unpickled is loaded, torch.load is
weights-only, onnx is pinned past its external-data path-traversal fixes, no secret reaches MLflow; and a champion
project on which bad inputs through the real pipeline change nothing."""

from __future__ import annotations

import ast
import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ottimo.config import load_params
from ottimo.data import versioning
from ottimo.models.family import Recipe, build
from ottimo.onnx.export import IntegrityError, export_onnx, sha256
from ottimo.ops import servers
from ottimo.ops.postgres import free_port
from ottimo.registry import security, versions
from ottimo.registry.tracking import connect, flatten
from ottimo.spec import InputSpec
from tests.conftest import REPO, seeded_harness, write_project
from tests.helpers import bad_inputs

PLANTED = "PLANTED-0b5e55ed"  # in every secret value below; must appear nowhere in the MLflow store
SECRET_ENV = {"OTTIMO_API_KEY": f"sk-{PLANTED}-1", "MY_SECRET_TOKEN": f"tok-{PLANTED}-2",
              "DB_PASSWORD": f"pw-{PLANTED}-3"}
DASK_WITH_PASSWORD = f"tcp://admin:{PLANTED}@127.0.0.1:8786"
LIGHT_CARD = {"batch_sizes": [1, 8], "seconds_per_batch_size": 0.05, "importance_rows": 50, "importance_repeats": 1,
              "severities": [0.0, 0.4], "slices": []}


# --- unit checks: no servers, no flows ---------------------------------------------------------------------------

def test_logged_params_pass_an_allow_list():
    from ottimo.config import Params

    logged = flatten({"train": {"batch_size": 64, "api_key": "x", "mlp": {"lr": 0.1}}, "my_token": "y",
                      "family": "mlp", "surprise": {"nested": 1},
                      "families": {"mynet": {"hparams": {"channels": 8, "secret_key": "z"}, "oops": {"a": 1}}},
                      "tune": {"storage": f"postgresql://optuna:{PLANTED}@db:5432/optuna"}})
    assert logged == {"train.batch_size": "64", "family": "mlp", "families.mynet.hparams.channels": "8",
                      "tune.storage": "postgresql://***@db:5432/optuna"}  # a family's and a builder's own names pass
    every = flatten(Params().model_dump())  # every config key is known, so the whole config is still logged
    assert len(every) > 100 and "gate.min_accuracy" in every and "deploy.host" in every


def test_torch_load_is_weights_only_everywhere():
    calls = []
    for folder in ("ottimo", "tasks", "flows", "bench", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                             for k in node.keywords)
                    calls.append((f"{path.relative_to(REPO)}:{node.lineno}", ok))
    assert calls, "expected torch.load calls (tasks/evaluate.py loads checkpoints)"
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]


def test_onnx_is_pinned_past_the_external_data_path_traversal_fixes():
    """CVE-2022-25882 (1.13), CVE-2024-27318 (1.16), CVE-2024-5187 (1.17), CVE-2025-51480 / CVE-2026-27489 (1.21)."""
    installed = tuple(int(p) for p in onnx.__version__.split(".")[:2])
    assert installed >= (1, 21), onnx.__version__
    assert f'"onnx=={onnx.__version__}"' in (REPO / "pyproject.toml").read_text()


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:

    model = build(Recipe("mlp", "ottimo.models.builtin.mlp:build", {"hidden": [8]}), InputSpec.tabular(8), 3)
    return export_onnx(model, InputSpec.tabular(8), tmp_path / "model.onnx")


def test_serving_refuses_a_tampered_file_and_external_data(onnx_file, tmp_path):
    digest = sha256(onnx_file)
    out = security.serving_session(onnx_file, digest).run(None, {"features": np.zeros((2, 8), np.float32)})[0]
    assert out.shape == (2, 3)

    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF
    tampered = tmp_path / "tampered.onnx"
    tampered.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="refusing to load"):
        security.serving_session(tampered, digest)

    # weights in a file beside the model, named with a path out of the folder: refused before anything reads it
    model = onnx.load(str(onnx_file))
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(model, str(external), save_as_external_data=True, location="weights.bin", size_threshold=0)
    ext_model = onnx.load(str(external), load_external_data=False)
    for t in ext_model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../../../../etc/passwd"
    onnx.save_model(ext_model, str(external))
    with pytest.raises(security.UnsafeModelError, match="external data"):
        security.serving_session(external, sha256(external))  # a matching hash does not make it safe


class _Pickled(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


def test_no_pickle_is_unpickled_on_the_serving_path(tmp_path):
    mlflow.pyfunc.save_model(str(tmp_path / "pickled"), python_model=_Pickled(), pip_requirements=[])  # cloudpickle
    with security.no_pickle(), pytest.raises(MlflowException, match="pickle is disallowed"):
        mlflow.pyfunc.load_model(str(tmp_path / "pickled"))
    mlflow.pyfunc.load_model(str(tmp_path / "pickled"))  # outside the block MLflow's default is back (allowed)
    env = servers.environment(tmp_path, servers.Endpoints("127.0.0.1", 1, 2))
    assert env[security.NO_PICKLE] == "false"  # the serve process and its flow runs


def test_server_commands_bind_loopback_and_turn_auth_on_from_the_environment(tmp_path):
    root = write_project(tmp_path / "p")
    ep = servers.endpoints(root)
    plain = servers.commands(root, "params.yaml", ep, env={})
    for name in ("prefect", "mlflow"):
        argv = plain[name][0]
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--app-name" not in plain["mlflow"][0]
    serve_argv, serve_cwd = plain["serve"]
    assert (Path(serve_cwd) / "flows" / "serve.py").is_file(), serve_cwd  # the serve process starts from the repo
    authed = servers.commands(root, "params.yaml", ep, env={"MLFLOW_TRACKING_USERNAME": "u",
                                                            "MLFLOW_TRACKING_PASSWORD": "p"})
    assert authed["mlflow"][0][-2:] == ["--app-name", "basic-auth"]


# --- real servers with auth on --------------------------------------------------------------------------------------

def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def _status(url: str, headers: dict | None = None, body: dict | None = None) -> int:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


AUTH = {"PREFECT_SERVER_API_AUTH_STRING": "ops:prefect-Str0ng-pass", "MLFLOW_TRACKING_USERNAME": "ottimo",
        "MLFLOW_TRACKING_PASSWORD": "mlflow-Str0ng-pass-42"}


def _basic(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def _check_mlflow(ep: servers.Endpoints, monkeypatch) -> None:
    """Anonymous -> 401; MlflowClient with MLFLOW_TRACKING_USERNAME/PASSWORD works; a wrong password fails."""
    assert _status(f"{ep.mlflow_ui}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    client = MlflowClient(ep.mlflow_ui)
    exp = client.create_experiment("authenticated")
    assert client.get_experiment(exp).name == "authenticated"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(ep.mlflow_ui).search_experiments()
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", AUTH["MLFLOW_TRACKING_PASSWORD"])


def _check_prefect(api: str, post) -> None:
    """No header or a wrong string -> 401; the configured string -> 200."""
    assert post(f"{api}/flows/filter", {}) == 401
    assert post(f"{api}/flows/filter", _basic("ops:guess")) == 401
    assert post(f"{api}/flows/filter", _basic(AUTH["PREFECT_SERVER_API_AUTH_STRING"])) == 200


def _project_with_ports(tmp_path: Path) -> Path:
    return write_project(tmp_path / "project", {"deploy": {"prefect_port": free_port(),
                                                           "mlflow_port": free_port()}})


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_mlflow_server_with_basic_auth_listens_on_loopback_and_refuses_anonymous_requests(tmp_path, monkeypatch):
    for key, value in AUTH.items():
        monkeypatch.setenv(key, value)
    root = _project_with_ports(tmp_path)
    try:
        ep = servers.up(root, timeout=120, names=("mlflow",))
        assert _listening(ep.mlflow_port) == {"0100007F"}  # 127.0.0.1, and no IPv6 or wildcard socket
        _check_mlflow(ep, monkeypatch)
        assert (root / "mlruns" / "basic_auth.db").is_file()
    finally:
        servers.down(root)


def test_prefect_server_refuses_requests_without_the_auth_string():
    """Prefect's own API app (in process, no database needed) built with PREFECT_SERVER_API_AUTH_STRING set."""
    from fastapi.testclient import TestClient
    from prefect.server.api.server import create_api_app
    from prefect.settings import PREFECT_SERVER_API_AUTH_STRING, temporary_settings

    with temporary_settings({PREFECT_SERVER_API_AUTH_STRING: AUTH["PREFECT_SERVER_API_AUTH_STRING"]}):
        http = TestClient(create_api_app(ignore_cache=True))
    assert http.post("/flows/filter", json={}).status_code == 401
    assert http.get("/admin/version", headers=_basic("ops:guess")).status_code == 401
    assert http.get("/admin/version", headers=_basic(AUTH["PREFECT_SERVER_API_AUTH_STRING"])).status_code == 200
    assert http.get("/health").status_code == 200  # probes stay open


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_up_with_auth_serves_both_servers_on_loopback_only(tmp_path, monkeypatch):
    for key, value in AUTH.items():
        monkeypatch.setenv(key, value)
    root = _project_with_ports(tmp_path)
    try:
        ep = servers.up(root, timeout=150, names=("prefect", "mlflow"))
        for port in (ep.prefect_port, ep.mlflow_port):
            assert _listening(port) == {"0100007F"}, f"port {port} listens on {_listening(port)}"
        _check_prefect(ep.prefect_api, lambda url, headers: _status(url, headers, body={}))
        _check_mlflow(ep, monkeypatch)
    finally:
        servers.down(root)


# --- a champion project: secrets planted, bad inputs through the real pipeline ------------------------------------

@pytest.fixture(scope="module")
def champion(tmp_path_factory, prefect_db):
    """One pipeline run (one MLP) with secrets in the environment and a password in a config URL."""
    from flows.pipeline import training_pipeline

    root = write_project(tmp_path_factory.mktemp("champion") / "project", {
        "train": {"candidates": ["mlp"], "max_epochs": 6}, "tune": {"dask_address": DASK_WITH_PASSWORD},
        "evaluate": {"warmup": 2, "runs": 10}, "card": LIGHT_CARD})
    with pytest.MonkeyPatch.context() as mp, seeded_harness(prefect_db):
        for key, value in SECRET_ENV.items():
            mp.setenv(key, value)
        state = training_pipeline(project_dir=str(root), return_state=True)
        assert state.is_completed(), state.message
        yield root, training_pipeline


def test_secrets_never_reach_mlflow(champion):
    root, _ = champion
    params = load_params(root / "params.yaml")
    client, exp = connect(root, params.mlflow)
    run = client.search_runs([exp], "tags.`ottimo.kind` = 'pipeline'")[0]
    assert run.data.params["tune.dask_address"] == "tcp://***@127.0.0.1:8786"  # logged, with the password out
    leaks = []
    for path in (root / "mlruns").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaks += [f"{path.relative_to(root)}: {s}" for s in (PLANTED, *SECRET_ENV) if s.encode() in data]
    assert leaks == []


def _snapshot(root: Path) -> dict:
    params = load_params(root / "params.yaml")
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    return {"aliases": versions.aliases(client, name),
            "versions": len(client.search_model_versions(f"name = '{name}'")),
            "dvc.lock": (root / "dvc.lock").read_text(),
            "raw.dvc": (root / f"{params.data.path}.dvc").read_text(),
            "remote": sorted(str(p.relative_to(root)) for p in (root / ".dvc-remote").rglob("*")),
            "cloud": versioning.status_cloud(root)}


@pytest.mark.parametrize("case_id", ["nan", "file-too-large", "config-params-outside"])
def test_bad_input_through_the_pipeline_leaves_champion_and_data_versions_untouched(champion, case_id, tmp_path):
    root, pipeline = champion
    case = next(c for c in bad_inputs.CASES if c.id == case_id)
    before = _snapshot(root)
    assert before["aliases"].get("champion") and before["cloud"] == {}
    raw = root / load_params(root / "params.yaml").data.path
    original = raw.read_bytes()
    try:
        if case.write:
            raw.unlink()
            case.write(raw, bad_inputs.good_frame(), tmp_path)
        bad = raw.stat()
        state = pipeline(project_dir=str(root), params_file=case.params_file, return_state=True)
        assert state.is_failed()
        for fragment in case.expect:
            assert fragment in state.message, state.message
        assert _snapshot(root) == before  # champion, versions, dvc.lock, the raw .dvc file, the remote
        assert (raw.stat().st_size, raw.stat().st_mtime_ns) == (bad.st_size, bad.st_mtime_ns)  # left in place
        notes = list((root / "data" / "quarantine").glob(f"{raw.name}.*.reason.txt"))
        assert len(notes) == (1 if case.write else 0)
        if case.write:
            assert case.expect[0] in notes[0].read_text()
            notes[0].unlink()
    finally:
        raw.unlink(missing_ok=True)
        raw.write_bytes(original)
