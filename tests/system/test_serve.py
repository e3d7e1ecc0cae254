"""System tests of `ottimo serve`: the real server (a subprocess on a free port of 127.0.0.1, token auth on) over a
real MLflow registry of real ONNX versions (tests/helpers/loop_helpers.py: DVC-prepared digits, linear models).

One project and one server for the module, the tests in order: bad requests, a promotion under load, a tampered
version refused, served rows in the drift window, and a rollback by the drift check that reaches the endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ottimo import vocab
from ottimo.data import batches
from ottimo.monitor import ledger
from ottimo.onnx.measure import predict, session
from ottimo.ops.postgres import free_port
from ottimo.registry import promotion, versions
from ottimo.serving.client import Client, Load
from tests.conftest import REPO
from tests.helpers.loop_helpers import add_onnx_version, linear_onnx, loop_project

TOKEN = "test-token-not-a-secret"
SERVE = {"deploy": {"serve": {"poll_seconds": 0.5, "max_rows": 50, "max_body_bytes": 60_000}},
         "drift": {"min_rows": 100, "rollback_margin": 5.0}}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def start_server(root: Path, port: int, log: Path, token: str | None = TOKEN) -> subprocess.Popen:
    """`python -m ottimo.cli serve` on this clone's code, answering once /health says a model is served."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OTTIMO_SERVE_TOKEN=token or "")
    if not token:
        env.pop("OTTIMO_SERVE_TOKEN")
    proc = subprocess.Popen([sys.executable, "-m", "ottimo.cli", "serve", "-C", str(root), "--port", str(port)],
                            env=env, cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)

    def healthy():
        assert proc.poll() is None, f"ottimo serve exited: {log.read_text()[-3000:]}"
        try:
            return Client("127.0.0.1", port, token).call("GET", "/health")[0] == 200
        except OSError:
            return False

    wait_for(healthy, 90, "ottimo serve did not answer /health")
    return proc


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(root, params, client, exp, [v1, v2], port, log): v2 champion, v1 previous-champion, the server on v2."""
    tmp = tmp_path_factory.mktemp("serve")
    root, params, client, exp, made = loop_project(tmp / "project", SERVE, versions=2)
    port, log = free_port(), tmp / "serve.log"
    proc = start_server(root, port, log)
    yield root, params, client, exp, made, port, log
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def api(port: int) -> Client:
    return Client("127.0.0.1", port, TOKEN)


def rows_of(root: Path, n: int, seed: int = 0) -> tuple[list, np.ndarray]:
    test = pd.read_parquet(root / "data" / "prepared" / "test.parquet")
    features = batches.schema_of(root / "data" / "prepared")["features"]
    X = test[features].sample(n=n, random_state=seed, replace=n > len(test)).to_numpy(dtype="float32")
    return [dict(zip(features, map(float, r), strict=True)) for r in X], X


def serving(port: int) -> str | None:
    return (api(port).call("GET", "/model")[1].get("serving") or {}).get("version")


def test_bad_requests_get_a_named_4xx_and_the_server_keeps_serving(served):
    root, params, client, exp, (v1, v2), port, log = served
    rows, X = rows_of(root, 3)
    features = list(rows[0])
    good = json.dumps({"rows": rows}).encode()
    cases = {  # name: (body, status, words in the error)
        "not-json": (b"rows=1", 400, "not JSON"),
        "not-utf8": (b'{"rows": "\xe9"}', 400, "not JSON"),
        "no-rows-key": (b'{"data": []}', 422, '"rows"'),
        "empty-rows": (b'{"rows": []}', 422, "non-empty"),
        "missing-column": (json.dumps({"rows": [{k: v for k, v in rows[0].items() if k != "pixel_2_2"}]}).encode(),
                           422, "missing ['pixel_2_2']"),
        "extra-column": (json.dumps({"rows": [rows[0] | {"leak": 1}]}).encode(), 422, "unexpected ['leak']"),
        "wrong-shape": (json.dumps({"rows": [[0.0] * 63]}).encode(), 422, "63 values"),
        "row-not-a-row": (b'{"rows": [5]}', 422, "row 0 is int"),
        "text-value": (json.dumps({"rows": [rows[0] | {features[3]: "dark"}]}).encode(), 422, "is not a number"),
        "bool-value": (json.dumps({"rows": [rows[0] | {features[3]: True}]}).encode(), 422, "is not a number"),
        "nan": (good.replace(b"0.0", b"NaN", 1), 422, "NaN"),
        "inf": (good.replace(b"0.0", b"Infinity", 1), 422, "Infinity"),
        "overflow": (good.replace(b"0.0", b"1e400", 1), 422, "not finite"),
        "extreme-value": (good.replace(b"0.0", b"1e300", 1), 422, "max_abs_value"),
        "too-many-rows": (json.dumps({"rows": [[0.0] * 64] * 51}).encode(), 422, "max_rows = 50"),
        "body-too-large": (b" " * 70_000 + good, 413, "max_body_bytes"),
    }
    for name, (body, status, words) in cases.items():
        code, answer = api(port).call("POST", "/predict", body)
        assert (code, answer.get("status")) == (status, status) and words in answer["error"], (name, code, answer)
        assert api(port).call("POST", "/predict", good)[0] == 200, f"not serving after {name}"
    # a body announced too large is refused before it is read; chunked bodies are counted as they stream
    code, answer = api(port).call("POST", "/predict", good, {"Content-Length": "999999999"})
    assert code == 413
    assert api(port).call("GET", "/predict")[0] == 405 and api(port).call("GET", "/nope")[0] == 404
    assert api(port).call("POST", "/labels", b'{"id": "serve-x.0.1", "labels": [1]}')[0] == 404
    assert api(port).call("POST", "/labels", b'{"id": "../../etc.0.1", "labels": [1]}')[0] == 404
    assert api(port).call("POST", "/labels", b'{"id": "x", "labels": [99]}')[0] == 422
    # auth: without or with a wrong token, 401 and no answer; /health stays open
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        code, answer = Client("127.0.0.1", port).call("POST", "/predict", good, headers)
        assert code == 401 and "bearer token" in answer["error"]
    assert Client("127.0.0.1", port).call("GET", "/health")[0] == 200
    code, answer = api(port).call("POST", "/predict", good)
    assert code == 200 and answer["version"] == v2 and len(answer["labels"]) == 3
    assert np.allclose(np.sum(answer["probabilities"], axis=1), 1, atol=1e-4)
    assert TOKEN not in log.read_text()


def test_a_promotion_under_load_switches_the_answering_version_with_no_failed_request(served):
    root, params, client, exp, (v1, v2), port, log = served
    name = params.mlflow.registered_model
    rows, X = rows_of(root, 4, seed=1)
    load = Load("127.0.0.1", port, rows, clients=4, token=TOKEN).start()
    try:
        wait_for(lambda: len(load.answers) > 50, 30, "no steady load")
        moved = time.monotonic()
        promotion.promote(client, name, v1, v2)
        wait_for(lambda: any(a.version == v1 and a.t > moved for a in load.answers), 15, "v1 never answered")
        first = min(a.t for a in load.answers if a.version == v1 and a.t > moved) - moved
        time.sleep(0.5)
    finally:
        load.stop()
    assert not load.errors and {a.status for a in load.answers} == {200}, load.errors[:3]
    assert first < 5, f"{first:.2f} s from the alias move to the first answer by v{v1}"
    after = [a.version for a in sorted(load.answers, key=lambda a: a.t) if a.t > moved + first + 0.2]
    assert after and set(after) == {v1}  # once swapped, only the new version answers
    # the answers agree with the version's own ONNX file, run in-process
    path, _ = versions.download_verified(client, name, v1, root.parent / "check-v1")
    expected = predict(session(path), X).tolist()
    assert api(port).predict(rows)[1]["labels"] == expected
    promotion.promote(client, name, v2, v1)  # back to v2 champion, v1 previous, for the next tests
    wait_for(lambda: serving(port) == v2, 10, "v2 not served again")


def _tampered_version(client, exp, name, root: Path, revision: str) -> str:
    """A registered version whose stored ONNX file was replaced after its sha256 was tagged."""
    version = add_onnx_version(client, exp, name, root.parent / "models", revision, seed=7)
    run = client.get_run(versions.version(client, name, version).run_id)
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "model" / versions.ONNX_FILE
    linear_onnx(stored, 64, 10, seed=8)
    return version


def test_a_tampered_version_is_refused_and_the_old_one_keeps_serving(served):
    root, params, client, exp, (v1, v2), port, log = served
    name = params.mlflow.registered_model
    revision = vocab.tag(versions.version(client, name, v2).tags, vocab.DATA_REVISION)
    v3 = _tampered_version(client, exp, name, root, revision)
    rows, _ = rows_of(root, 2, seed=2)
    load = Load("127.0.0.1", port, rows, clients=2, token=TOKEN).start()
    try:
        promotion.promote(client, name, v3, v2)
        state = wait_for(lambda: (s := api(port).call("GET", "/model")[1])["refused"] and s, 15, "v3 not refused")
        code, again = api(port).call("POST", "/reload")  # tried again on request: refused again, same reason
        time.sleep(0.5)
    finally:
        load.stop()
    assert state["serving"]["version"] == v2 and state["alias_points_at"] == v3
    assert state["refused"]["version"] == v3 and "IntegrityError" in state["refused"]["reason"]
    assert code == 200 and again["refused"]["version"] == v3 and again["serving"]["version"] == v2
    assert {a.status for a in load.answers} == {200} and {a.version for a in load.answers} == {v2}
    assert f"REFUSED {name} v{v3}" in log.read_text() and "does not match" in log.read_text()
    promotion.move(client, name, {versions.CHAMPION: v2, versions.PREVIOUS: v1}, v3, "test: undo")
    wait_for(lambda: api(port).call("GET", "/model")[1]["alias_points_at"] == v2, 10, "alias back at v2")
    assert serving(port) == v2


def test_served_rows_and_their_labels_are_in_the_next_drift_window(served):
    root, params, client, exp, (v1, v2), port, log = served
    rows, X = rows_of(root, 40, seed=3)
    ids = [api(port).predict(rows[i:i + 10])[1]["id"] for i in range(0, 40, 10)]
    code, answer = api(port).call("POST", "/labels", {"id": ids[0], "labels": [1] * 10})
    assert (code, answer["result"]) == (202, "queued")
    assert api(port).call("POST", "/labels", {"id": ids[1], "labels": [1] * 9})[0] == 422  # one per row
    assert api(port).call("POST", "/traffic/flush")[0] == 200
    code, answer = api(port).call("POST", "/labels", {"id": ids[1], "labels": [2] * 10})  # after the close
    assert (code, answer["result"]) == (202, "applied")
    mclient, mexp = ledger.connect_monitoring(root, params)
    runs = [r for r in ledger.unchecked(mclient, mexp) if r.data.tags.get("source") == "serve"]
    window = batches.window([Path(r.data.tags["batch.path"]) for r in runs], batches.schema_of(
        root / "data" / "prepared"))
    mine = pd.concat([pd.read_parquet(r.data.tags["batch.path"]) for r in runs])
    mine = mine[mine["request_id"].isin(ids)]
    assert len(mine) == 40 and np.allclose(mine[list(rows[0])].to_numpy(), X)
    assert mine.groupby("request_id")["target"].first().dropna().to_dict() == {ids[0]: 1, ids[1]: 2}
    assert len(window) >= 40 and window["target"].notna().sum() >= 20
    assert all(batches.predictions_path(Path(r.data.tags["batch.path"])).is_file() for r in runs)
    assert {r.data.tags["model.version"] for r in runs} >= {v2}


def test_a_rollback_by_the_drift_check_reaches_the_endpoint(served, prefect_harness):
    """Labelled traffic on which the champion (v2) is far worse than previous-champion (v1): the scheduled drift
    check (the real flow) rolls back, and the endpoint answers with v1 by itself."""
    from flows.drift import drift_check

    root, params, client, exp, (v1, v2), port, log = served
    name = params.mlflow.registered_model
    rows, X = rows_of(root, 150, seed=4)
    path, _ = versions.download_verified(client, name, v1, root.parent / "truth-v1")
    truth = predict(session(path), X).tolist()  # v1 is right on every row by construction
    for i in range(0, 150, 50):
        rid = api(port).predict(rows[i:i + 50])[1]["id"]
        assert api(port).call("POST", "/labels", {"id": rid, "labels": truth[i:i + 50]})[0] == 202
    assert api(port).call("POST", "/traffic/flush")[0] == 200
    state = drift_check(project_dir=str(root), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().action == "rollback", state.result().reasons
    assert versions.aliases(client, name)["champion"] == v1
    wait_for(lambda: serving(port) == v1, 10, "the endpoint did not follow the rollback")
    assert api(port).predict(rows[:5])[1]["version"] == v1
    mclient, mexp = ledger.connect_monitoring(root, params)
    assert not [r for r in ledger.unchecked(mclient, mexp) if r.data.tags.get("source") == "serve"]
