"""System test in a real browser: `ottimo.ops.servers` starts Prefect, MLflow and the deployments on free ports in a
temporary project; headless Chromium runs the training deployment from the Prefect UI and finds the new champion
in the MLflow UI. Screenshots and the servers' logs go to test-output/ui/."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from ottimo.ops import servers
from ottimo.ops.postgres import free_port
from tests.conftest import REPO, write_project

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
OUT = REPO / "test-output" / "ui"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]
RUN_TIMEOUT = 360  # seconds for the flow run started from the UI


def api(ep: servers.Endpoints, path: str, body: dict | None = None):
    req = urllib.request.Request(f"{ep.prefect_api}{path}", data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def stack(tmp_path: Path):
    """The four processes of `make up` for a tiny project (one MLP, a few epochs, no tuning); always stopped."""
    ports = {"prefect_port": free_port(), "mlflow_port": free_port(), "serve": {"port": free_port()}}
    root = write_project(tmp_path / "project", {"train": {"candidates": ["mlp"]}, "deploy": ports})
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        yield root, servers.up(root, timeout=120)
    finally:
        stopped = servers.down(root)
        for log in (root / ".run").glob("*.log"):
            shutil.copy(log, OUT / log.name)
        assert not list((root / ".run").glob("*.pid")), f"pid files left after stopping {stopped}"


@pytest.fixture
def browser(tmp_path: Path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (`make test` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def wait_text(driver, text: str, shot: str, timeout: float = 60) -> str:
    """Wait until the page's text contains `text`; screenshot to test-output/ui/<shot>.png either way."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if text in body:
            break
        time.sleep(0.5)
    time.sleep(0.5)
    driver.save_screenshot(str(OUT / f"{shot}.png"))
    assert text in body, f"{text!r} not on {driver.current_url} after {timeout:.0f} s (see {OUT / shot}.png)"
    return body


def click(driver, text: str, shot: str, timeout: float = 30) -> None:
    """Click the visible button or menu item whose text is `text`."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for el in driver.find_elements(By.XPATH, f"//*[self::button or @role='menuitem' or @role='tab' or self::a]"
                                                 f"[normalize-space(.)='{text}']"):
            if el.is_displayed() and settled(el):
                el.click()
                time.sleep(0.5)
                driver.save_screenshot(str(OUT / f"{shot}.png"))
                return
        time.sleep(0.5)
    driver.save_screenshot(str(OUT / f"{shot}.png"))
    raise AssertionError(f"no visible {text!r} on {driver.current_url} (see {OUT / shot}.png)")


def settled(el, pause: float = 0.3) -> bool:
    """The element is where it was a moment ago (a menu that is still opening moves: a click would miss it)."""
    before = el.rect
    time.sleep(pause)
    return el.rect == before


def server_errors(root: Path) -> str:
    """The Prefect server's log lines that say ERROR or hold a traceback's last line (for a failure's message)."""
    log = root / ".run" / "prefect.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join([ln for ln in lines if "ERROR" in ln or "Error:" in ln][-10:]) or "(no errors in prefect.log)"


def quick_run(driver, ep: servers.Endpoints, deployment_id: str, root: Path) -> dict:
    """Run → Quick run on a deployment's page, as a user would; the flow run it made, found by the name in the
    UI's toast. A click that made nothing (no toast, no error: the menu went before it landed) is made again once;
    an error toast fails at once."""
    from selenium.webdriver.common.by import By

    page = f"{ep.prefect_ui}/deployments/deployment/{deployment_id}"
    for attempt in (1, 2):
        driver.get(page)
        wait_text(driver, "training-pipeline", "2-deployment")
        click(driver, "Run", "3-run-menu")
        click(driver, "Quick run", "4-quick-run")
        deadline, body = time.monotonic() + 30, ""
        while time.monotonic() < deadline:
            body = driver.find_element(By.TAG_NAME, "body").text
            assert "Failed to schedule flow run" not in body, \
                f"the UI could not create the run: {body}\nserver: {server_errors(root)}"
            if made := re.search(r"(\S+) scheduled\s+to\s+start", body):
                driver.save_screenshot(str(OUT / "4-quick-run.png"))
                runs = api(ep, "/flow_runs/filter", {"flow_runs": {"name": {"any_": [made.group(1)]}}})
                assert len(runs) == 1, (made.group(1), runs)
                return runs[0]
            time.sleep(0.5)
        driver.save_screenshot(str(OUT / f"4-quick-run-attempt-{attempt}.png"))
        if runs := [r for r in api(ep, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
                    if not r["auto_scheduled"]]:  # made, though its toast went unseen: not a second one
            return runs[0]
    raise AssertionError(f"Quick run made no flow run twice (see {OUT}/4-quick-run-attempt-*.png): {body}\n"
                         f"server: {server_errors(root)}")


@pytest.mark.timeout(900)
def test_run_from_prefect_ui_promotes_in_mlflow_ui(stack, browser):
    root, ep = stack

    # the deployments page lists every deployment by a name that says what it does, the nightly one with its schedule
    browser.get(f"{ep.prefect_ui}/deployments")
    body = wait_text(browser, "rollback-champion", "1-deployments")
    for name in ("nightly", "tune-hyperparameters", "score-incoming", "scheduled", "promote-version"):
        assert name in body, body
    assert "At 02:00 AM every day" in body, body  # the cron "0 2 * * *" from params.yaml, as the UI words it
    names = {d["name"] for d in api(ep, "/deployments/filter", {"limit": 50})}
    assert names == {"nightly", "tune-hyperparameters", "score-incoming", "scheduled", "promote-version",
                     "rollback-champion"}, names
    deployment = api(ep, "/deployments/name/training-pipeline/nightly")
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

    # its page: Run → Custom run shows what an empty field means, from params.yaml
    page = f"{ep.prefect_ui}/deployments/deployment/{deployment['id']}"
    browser.get(page)
    wait_text(browser, "training-pipeline", "2-deployment")
    click(browser, "Run", "3-run-menu")
    click(browser, "Custom run", "3-custom-run-menu")
    body = wait_text(browser, "empty: params.yaml's gate.min_accuracy (0.9)", "3-custom-run-form")
    assert "empty: params.yaml's train.max_epochs (12)" in body and "Property is type" not in body, body

    # Run → Quick run: the flow run it created is the deployment's and reaches Completed
    run = quick_run(browser, ep, deployment["id"], root)
    assert run["deployment_id"] == deployment["id"] and not run["auto_scheduled"], run
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and run["state_type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        time.sleep(3)
        run = api(ep, f"/flow_runs/{run['id']}")
    browser.get(f"{ep.prefect_ui}/runs/flow-run/{run['id']}")
    wait_text(browser, "Completed" if run["state_type"] == "COMPLETED" else run["state_name"] or "", "5-flow-run")
    assert run["state_type"] == "COMPLETED", f"flow run {run['name']} ended {run['state_name']}: see serve.log"

    # its Task Runs tab lists the task runs, each per-candidate one named after its candidate
    found = browser.execute_script(  # the tab whose whole text is "Task Runs" (the UI's tabs are not buttons)
        "const els = [...document.querySelectorAll('*')].filter(e => e.offsetParent !== null &&"
        " e.textContent.replace(/\\s+/g, ' ').trim().toLowerCase() === 'task runs');"
        "if (els.length) els[els.length - 1].click(); return els.length;")
    assert found, f"no Task Runs tab on {browser.current_url}"
    body = wait_text(browser, "register_candidate[mlp]", "5-task-runs")
    assert "train_candidate[mlp]" in body and "Beginning flow run" not in body, body  # the list, not the logs
    inputs = {i["input_type"] for t in api(ep, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}},
                                                                      "limit": 200})
              for arg in t["task_inputs"].values() for i in arg}
    assert "flow_run" not in inputs, inputs

    # the MLflow registry shows the champion alias on the version the run registered
    browser.get(f"{ep.mlflow_ui}/#/models/ottimo-classifier")
    body = wait_text(browser, "champion", "6-mlflow-registry")
    assert "Version 1" in body, body

    # cross-links: the MLflow run names the Prefect flow run and its UI page; the flow run links back
    from mlflow import MlflowClient

    client = MlflowClient(ep.mlflow_ui, ep.mlflow_ui)
    champion = client.get_model_version_by_alias("ottimo-classifier", "champion")
    parent = client.get_run(client.get_run(champion.run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["prefect.flow_run_id"] == run["id"]
    assert parent.data.tags["prefect.flow_run_url"] == f"{ep.prefect_ui}/runs/flow-run/{run['id']}"
    artifact = api(ep, "/artifacts/filter", {"artifacts": {"key": {"any_": ["pipeline-summary"]}}})[0]
    assert artifact["flow_run_id"] == run["id"]
    assert f"{ep.mlflow_ui}/#/models/ottimo-classifier/versions/1" in artifact["data"]
    assert f"runs/{parent.info.run_id}" in artifact["data"] and "**Gate: PASS**" in artifact["data"]

    # MLflow's page of the pipeline run: a name that explains it, the gated candidate's metrics and the verdict,
    # its description; the experiment opens in the classic ML view
    from ottimo import vocab

    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags[vocab.EXPERIMENT_KIND] == vocab.CLASSIC_ML
    assert parent.info.run_name.startswith("pipeline ") and parent.info.run_name.endswith(" → v1 PASS")
    figures = {"test_accuracy", "test_macro_f1", "test_p50_ms", "test_p95_ms", "test_size_mb"}
    assert parent.data.metrics[vocab.GATE_PASSED] == 1.0 and figures <= set(parent.data.metrics)
    assert "PASS" in parent.data.tags[vocab.NOTE] and f"({ep.prefect_ui}/runs/flow-run/{run['id']})" in \
        parent.data.tags[vocab.NOTE]
    # the link the pipeline-summary artifact gives: it switches MLflow's sidebar to the classic (training) view
    browser.get(f"{ep.mlflow_ui}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}{vocab.CLASSIC_VIEW}")
    body = wait_text(browser, "gate_passed", "7-mlflow-pipeline-run")
    assert parent.info.run_name in body and "test_accuracy" in body and "test_p95_ms" in body, body
    assert "flow run" in body, body  # the description, with its link to the Prefect flow run

    # the candidate's ONNX model is logged in the run's experiment (not Default), named after its family
    candidate = client.get_run(champion.run_id)
    models = client.search_logged_models([exp.experiment_id])
    assert [m.name for m in models if m.source_run_id == candidate.info.run_id] == ["mlp"]
    assert not client.search_logged_models([client.get_experiment_by_name("Default").experiment_id])
    assert champion.source == f"models:/{models[0].model_id}" or models[0].model_id in champion.source
    browser.get(f"{ep.mlflow_ui}/#/experiments/{exp.experiment_id}/runs/{candidate.info.run_id}{vocab.CLASSIC_VIEW}")
    body = wait_text(browser, "Logged models (1)", "8-mlflow-candidate-run")
    assert "mlp" in body, body
    browser.get(f"{ep.mlflow_ui}/#/experiments/{exp.experiment_id}/models{vocab.CLASSIC_VIEW}")
    wait_text(browser, "mlp", "9-mlflow-logged-models")
    browser.get(f"{ep.mlflow_ui}/#/experiments/{exp.experiment_id}/runs{vocab.CLASSIC_VIEW}")
    body = wait_text(browser, parent.info.run_name, "10-mlflow-experiment-runs")
    assert "Agent versions" not in body and "Model registry" in body, body  # the classic sidebar

    # the version's description: the model card, its tables spaced
    browser.get(f"{ep.mlflow_ui}/#/models/ottimo-classifier/versions/1")
    wait_text(browser, "Model card", "11-mlflow-version-card")


def test_compression_report_is_readable_in_a_browser(browser, tmp_path):
    """The compression report's HTML in Chromium (a styled table) and pareto.png with candidates close together."""
    from ottimo.compress import pareto

    def row(name: str, technique: str, acc: float, p95: float, size: float) -> pareto.Row:
        return pareto.Row(name, technique, "" if technique == "trained" else "mlp",
                          {"accuracy": acc, "macro_f1": acc - 0.002, "p50_ms": p95 * 0.8, "p95_ms": p95,
                           "throughput_rps": 90_000.0, "size_mb": size}, parameters=4810, run_id=name)

    rows = [row("mlp", "trained", 0.9667, 0.0210, 0.02), row("student-mlp", "distill", 0.9750, 0.0209, 0.01),
            row("student-mlp+prune-s50", "prune-structured", 0.9778, 0.0212, 0.008),
            row("student-mlp+int8-qdq-minmax", "int8-qdq-minmax", 0.9750, 0.0290, 0.006),
            row("student-mlp+prune-s50+int8-qdq-minmax", "int8-qdq-minmax", 0.9722, 0.0300, 0.005),
            row("transformer", "trained", 0.9611, 0.1400, 0.08)]
    reasons = {r.name: f"lost: p95 {r.metrics['p95_ms']:.4f} ms is above the chosen one's; within the accuracy "
                       "floor and the drop allowed against the teacher" for r in rows}
    reasons["student-mlp+prune-s50"] = "chosen: best accuracy among the candidates that can pass the gate"
    selection = pareto.Selection("student-mlp+prune-s50", "p95_ms", reasons)  # the report, whatever the policy
    OUT.mkdir(parents=True, exist_ok=True)
    page = tmp_path / "report.html"
    page.write_text(pareto.html(rows, selection, "Compression of mlp: 6 candidates"))
    pareto.pareto_png(rows, selection, OUT / "pareto.png")
    browser.get(page.as_uri())
    body = wait_text(browser, "student-mlp+prune-s50+int8-qdq-minmax", "12-compression-report")
    from selenium.webdriver.common.by import By

    widths = [el.size["width"] for el in browser.find_elements(By.CSS_SELECTOR, "td")]
    assert min(widths) > 30, widths  # no one-character columns
    assert "Selected:" in body
