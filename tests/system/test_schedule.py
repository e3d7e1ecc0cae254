"""A schedule fires: a real `prefect server` (its own PREFECT_HOME and SQLite database) creates a run of a served
deployment from its schedule, and that run completes. Issue 12: with SQLAlchemy 2.1 Prefect 3.8.8's scheduler
failed every loop and no scheduled run was ever created, while the UI still showed the schedule."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from ottimo.ops.postgres import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

DEADLINE_S = 120  # the whole test, server start included
NO_RUN_S = 30  # a scheduler that has created no run this long after the deployment appeared is broken
FLOW, DEPLOYMENT, INTERVAL_S = "schedule-probe", "every-5s", 5
SERVED = textwrap.dedent(f"""
    from prefect import flow

    @flow(name="{FLOW}")
    def probe() -> int:
        return 1

    if __name__ == "__main__":
        probe.serve(name="{DEPLOYMENT}", interval={INTERVAL_S}, limit=1)
""")
# Not ours to inherit: the developer's server, profile or database must not leak in.
INHERITED = ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_API_DATABASE_CONNECTION_URL",
             "PREFECT_SERVER_DATABASE_CONNECTION_URL")


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               MLFLOW_DISABLE_TELEMETRY="true")
    home.mkdir(parents=True, exist_ok=True)
    return env


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group and every descendant (a runner may put flow runs in sessions of their own)."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        if not alive:
            break
    proc.wait(timeout=10)


@contextmanager
def spawned(cmd: list[str], env: dict[str, str], log: Path):
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return f"--- {log.name} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])


def test_served_schedule_creates_a_run_that_completes(tmp_path: Path):
    start = time.monotonic()
    deadline = start + DEADLINE_S
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server_env = base_env(tmp_path / "server-home")
    server_env.update(
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",  # the main scheduler loop (60 s by default)
        PREFECT_SERVER_UI_ENABLED="false",
    )
    runner_env = base_env(tmp_path / "runner-home")
    runner_env.update(PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="1")  # the runner polls every 10 s by default
    (tmp_path / "served.py").write_text(SERVED)
    prefect = [sys.executable, "-m", "prefect"]

    def logs() -> str:
        return tail(server_log) + "\n" + tail(serve_log)

    with spawned([*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env,
                 server_log) as server, httpx.Client(base_url=api, timeout=10) as http:
        while True:
            assert server.poll() is None, f"prefect server exited with {server.returncode}\n{logs()}"
            assert time.monotonic() < deadline, f"prefect server not healthy after {DEADLINE_S} s\n{logs()}"
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        healthy = time.monotonic()

        with spawned([sys.executable, str(tmp_path / "served.py")], runner_env, serve_log) as serve:
            deployment, appeared, runs = None, None, []
            while True:
                assert serve.poll() is None, f"flow.serve exited with {serve.returncode}\n{logs()}"
                now = time.monotonic()
                assert now < deadline, f"no scheduled run completed in {DEADLINE_S} s: {runs}\n{logs()}"
                if deployment is None:
                    got = http.get(f"/deployments/name/{FLOW}/{DEPLOYMENT}")
                    if got.status_code == 200:
                        deployment, appeared = got.json(), now
                else:
                    runs = http.post("/flow_runs/filter", json={
                        "deployments": {"id": {"any_": [deployment["id"]]}}}).raise_for_status().json()
                    assert runs or now - appeared < NO_RUN_S, (
                        f"the scheduler created no run of {FLOW}/{DEPLOYMENT} (interval {INTERVAL_S} s) "
                        f"{NO_RUN_S} s after the deployment was created\n{logs()}")
                    done = [r for r in runs if r["state_type"] == "COMPLETED"]
                    if done:
                        break
                time.sleep(0.5)
            completed = time.monotonic()
            run = done[0]
            states = http.get("/flow_run_states/", params={"flow_run_id": run["id"]}).raise_for_status().json()

    # The server's scheduler created the run (this test never creates one): auto-scheduled, first state Scheduled.
    assert deployment["schedules"] and deployment["schedules"][0]["active"], deployment
    assert run["auto_scheduled"], run
    states.sort(key=lambda st: st["timestamp"])
    assert states[0]["type"] == "SCHEDULED" and states[0]["name"] == "Scheduled", states
    assert states[-1]["type"] == "COMPLETED", states
    print(f"server healthy in {healthy - start:.1f} s; {len(runs)} runs created, first completed "
          f"{completed - appeared:.1f} s after the deployment appeared; total {completed - start:.1f} s")
