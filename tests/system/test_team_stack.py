"""The team stack for real (`make up STACK=postgres WORKERS=2`): a throw-away PostgreSQL cluster, the S3 API
server, the Prefect server on Postgres with a process work pool and two workers, the MLflow server on Postgres
with artifacts in the bucket, a Dask scheduler with two workers, all on free ports of 127.0.0.1.

One pipeline run triggered through the work pool completes on a worker and promotes a champion in the
Postgres-backed registry, its ONNX file in the bucket and its data in the DVC remote on the bucket; a worker
killed mid-run leaves nothing that `ottimo doctor` finds once the pipeline ran again; nothing listens beyond
loopback; the Postgres password is in no log, argv, environment, MLflow param or tag."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from ottimo import vocab
from ottimo.ops import servers, stack
from ottimo.ops.postgres import free_port
from tests.conftest import REPO, write_project

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

OUT = REPO / "test-output" / "team-stack"
RUN_TIMEOUT = 600
LOOPBACK = ("127.0.0.1", "::1")
PORTS = ("OTTIMO_PREFECT_PORT", "OTTIMO_MLFLOW_PORT", "OTTIMO_SERVE_PORT", "OTTIMO_POSTGRES_PORT", "OTTIMO_S3_PORT",
         "OTTIMO_DASK_PORT")


@pytest.fixture
def team(monkeypatch):
    """A tiny project (one MLP; compression: one pruned and one INT8 variant) with the team stack up; always
    stopped. The project folder is 0711: the cluster in its .run/ belongs to the postgres user under root."""
    base = Path(tempfile.mkdtemp(prefix="ottimo-team-"))
    base.chmod(0o711)
    for name in PORTS:
        monkeypatch.setenv(name, str(free_port()))
    root = write_project(base / "project", {  # tuning and compression fan out to the stack's Dask workers
        "tune": {"enabled": True, "n_trials": 4, "n_jobs": 2, "runner": "dask"},
        "train": {"candidates": ["mlp"]}, "gate": {"min_gain": -100},  # reruns on the same data may trail
        "deploy": {"training_cron": None}, "drift": {"cron": None},
        "compress": {"enabled": True, "runner": "dask", "n_jobs": 2, "teacher": "mlp", "distill": {"enabled": False},
                     "bases": ["teacher"],
                     "prune": {"unstructured": [0.5], "structured": [], "finetune_epochs": 2},
                     "quantize": {"options": ["int8-dyn"]}}})
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        t = stack.up(root, workers=2, timeout=240)
        monkeypatch.setenv("PREFECT_API_URL", t.ep.prefect_api)
        yield root, t
    finally:
        stopped = servers.down(root)
        for log in (root / ".run").glob("*.log"):
            shutil.copy(log, OUT / log.name)
        assert not list((root / ".run").glob("*.pid")), f"pid files left after stopping {stopped}"
        shutil.rmtree(base, ignore_errors=True)


def _trigger(t: stack.Team, parameters: dict | None = None) -> str:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: t.ep.prefect_api}):
        run = run_deployment("training-pipeline/nightly", parameters=parameters or {}, timeout=0)
    return str(run.id)


def _flow_run(t: stack.Team, run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: t.ep.prefect_api}), get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _wait_final(t: stack.Team, run_id: str, timeout: float = RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _flow_run(t, run_id)
        if run.state and run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} not finished within {timeout} s: {run.state}")


def _ran_on(root: Path, run_id: str) -> list[str]:
    """The Prefect workers whose log names the flow run."""
    return [p.stem for p in (root / ".run").glob("prefect-worker-*.log") if run_id in p.read_text()]


def _mlflow(t: stack.Team):
    from mlflow import MlflowClient

    return MlflowClient(t.ep.mlflow_ui, registry_uri=t.ep.mlflow_ui)  # not a registry URI another test set


def _bucket(t: stack.Team) -> dict[str, bytes | None]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=t.s3_url, region_name="us-east-1", aws_access_key_id="x",
                      aws_secret_access_key="y")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=t.cfg.bucket)
    keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
    return {k: s3.get_object(Bucket=t.cfg.bucket, Key=k)["Body"].read() if k.endswith(".onnx") else None
            for k in keys}


def _stack_pids(root: Path) -> set[int]:
    """Every process of the stack: the pid files' processes and their children, and the postmaster's."""
    pids = {int(p.read_text()) for p in (root / ".run").glob("*.pid")}
    pids.add(int((root / ".run" / "postgres" / "postmaster.pid").read_text().splitlines()[0]))
    found = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        found |= {pid, *(c.pid for c in proc.children(recursive=True))}
    return found


def _doctor(root: Path, t: stack.Team) -> subprocess.CompletedProcess:
    env = stack.environment(root, t, stack.cluster(root, t))
    return subprocess.run([sys.executable, "-m", "ottimo.cli", "doctor", "-C", str(root)], env=env,
                          capture_output=True, text=True, timeout=180)


def test_a_run_through_the_work_pool_promotes_a_champion_on_postgres_with_artifacts_in_the_bucket(team):
    root, t = team
    pg = stack.cluster(root, t)

    # 1. triggered as the UI does, run by one of the pool's workers
    first = _wait_final(t, _trigger(t))
    assert first.state.is_completed(), first.state.message
    assert first.work_pool_name == t.cfg.work_pool
    assert len(_ran_on(root, str(first.id))) == 1, "exactly one Prefect worker took the flow run"

    # 2. the champion is in the registry MLflow keeps in Postgres ...
    with pg.connect("mlflow") as conn:
        [(version,)] = conn.execute("SELECT version FROM registered_model_aliases WHERE alias = 'champion'").fetchall()
    client = _mlflow(t)
    champion = client.get_model_version_by_alias("ottimo-classifier", "champion")
    assert str(version) == champion.version
    # ... its ONNX file in the bucket (the very bytes its sha256 tag names), its data in the DVC remote there
    objects = _bucket(t)
    model_id = champion.source.rsplit("/", 1)[-1]
    [onnx] = [b for k, b in objects.items() if k.startswith("mlflow/") and model_id in k and k.endswith(".onnx")]
    assert hashlib.sha256(onnx).hexdigest() == champion.tags["sha256"]
    revision = champion.tags[vocab.DATA_REVISION]
    assert any(k.startswith(f"dvc/files/md5/{revision[:2]}/{revision[2:]}") for k in objects), \
        f"data revision {revision} is not in the DVC remote"
    assert not list(root.glob(".dvc-remote*")), "nothing went to the local-directory remote"
    # tuning trials and compression variants ran on the stack's two Dask workers, both of them
    exps = [e.experiment_id for e in client.search_experiments()]
    made = client.search_runs(exps, max_results=1000)
    workers = {r.data.tags[vocab.WORKER] for r in made if vocab.WORKER in r.data.tags}
    assert len(workers) == 2 and all(w.startswith(f"tcp://{t.ep.host}:") for w in workers), workers

    # 3. a worker killed mid-run (its process group: the flow run goes with it) ...
    second = _trigger(t, {"max_epochs": 6})  # other params than the champion's: the run trains
    deadline = time.monotonic() + RUN_TIMEOUT
    while not client.search_runs(exps, f"tags.`{vocab.FLOW_RUN}` = '{second}' and tags.`{vocab.KIND}` = "
                                       f"'{vocab.CANDIDATE}'"):  # killed while it trains
        assert time.monotonic() < deadline, "the second run never started training"
        time.sleep(0.5)
    [worker] = _ran_on(root, second)
    proc = psutil.Process(int((root / ".run" / f"{worker}.pid").read_text()))
    for p in [*proc.children(recursive=True), proc]:  # the machine went: the worker and the flow run it started
        p.send_signal(signal.SIGKILL)
    assert _flow_run(t, second).state.is_running(), "Prefect still shows the killed run Running"
    # ... `up` starts it again, the pipeline runs again, and the doctor then finds nothing
    stack.up(root, workers=2, timeout=240)
    third = _wait_final(t, _trigger(t, {"max_epochs": 6}))
    assert third.state.is_completed(), third.state.message
    assert _flow_run(t, second).state.type.value == "CRASHED", "the rerun's reconcile set the killed run Crashed"
    doctor = _doctor(root, t)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "consistent" in doctor.stdout

    # 4. nothing listens beyond loopback
    pids = _stack_pids(root)
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert {c.pid for c in listening} >= {int((root / ".run" / f"{n}.pid").read_text()) for n in ("s3",)}
    beyond = [(c.laddr, psutil.Process(c.pid).cmdline()[:4]) for c in listening if c.laddr.ip not in LOOPBACK]
    assert not beyond, f"listening beyond loopback: {beyond}"
    assert len({c.laddr.port for c in listening}) >= 6  # postgres, s3, prefect, mlflow, dask scheduler, endpoint

    # 5. the Postgres password is in no log, argv, environment, MLflow param or tag
    password = pg.password_file.read_text().strip()
    logs = [*(root / ".run").glob("*.log"), pg.log_file]
    assert [p.name for p in logs if password in p.read_text(errors="replace")] == []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            assert password not in " ".join(proc.cmdline()), proc.cmdline()
            assert not any(password in v for v in proc.environ().values()), proc.name()
        except psutil.NoSuchProcess:
            continue
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)
    assert runs
    for r in runs:
        assert not any(password in str(v) for v in (*r.data.params.values(), *r.data.tags.values())), r.info.run_id
    assert not any(password in str(v) for mv in client.search_model_versions("name = 'ottimo-classifier'")
                   for v in mv.tags.values())
