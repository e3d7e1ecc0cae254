"""`make up` / `make down`: a Prefect server, an MLflow server, the deployments' serve process and the online
endpoint (`ottimo serve`, process `endpoint`), on 127.0.0.1.

Each process runs in its own session; its pid goes to `.run/<name>.pid` and its output to `.run/<name>.log`.
`down` signals exactly those process groups (the servers' own workers included) and keeps every data file:
Prefect's database under `.prefect/`, MLflow's under `mlruns/`.

Authentication is optional and comes from the environment, never from params.yaml: PREFECT_SERVER_API_AUTH_STRING
turns on the Prefect server's basic auth (every started process calls it with the same string);
MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD start MLflow's `basic-auth` app with that user as admin
(users in mlruns/basic_auth.db) and every started process logs in as that user.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from ottimo.config import load_params
from ottimo.registry import security, sqlite_store

CODE = Path(__file__).resolve().parents[2]  # the repository root, where flows/ lives: the serve processes run here
ORDER = ("prefect", "mlflow", "serve", "endpoint")
STACK_FILE = "stack.json"  # {"stack": embedded | postgres, "order": [names, in the order they started]}
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
         "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


@dataclass(frozen=True)
class Endpoints:
    host: str
    prefect_port: int
    mlflow_port: int
    serve_port: int = 8000  # `ottimo serve`: POST /predict

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.serve_port}"

    @property
    def prefect_ui(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api(self) -> str:
        return f"{self.prefect_ui}/api"

    @property
    def mlflow_ui(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"


def endpoints(root: Path, params_file: str = "params.yaml") -> Endpoints:
    """Host and ports from params.yaml's `deploy:`, the ports overridden by OTTIMO_PREFECT_PORT / OTTIMO_MLFLOW_PORT
    / OTTIMO_SERVE_PORT."""
    cfg = load_params(root / params_file).deploy
    return Endpoints(cfg.host, int(os.environ.get("OTTIMO_PREFECT_PORT") or cfg.prefect_port),
                     int(os.environ.get("OTTIMO_MLFLOW_PORT") or cfg.mlflow_port),
                     int(os.environ.get("OTTIMO_SERVE_PORT") or cfg.serve.port))


def environment(root: Path, ep: Endpoints) -> dict[str, str]:
    """What every started process sees: telemetry off, Prefect's home in the project, the servers' URLs."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env |= QUIET | security.auth_env(env) | {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_API_URL": ep.prefect_api,
        "PREFECT_UI_URL": ep.prefect_ui,
        "OTTIMO_TRACKING_URI": ep.mlflow_ui,
        security.NO_PICKLE: "false",  # the serve process and its flow runs never unpickle a model
    }
    if security.mlflow_auth(env):
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(root / ".run" / "basic_auth.ini"),
                "MLFLOW_AUTH_ADMIN_USERNAME": env[security.MLFLOW_USER],
                "MLFLOW_AUTH_ADMIN_PASSWORD": env[security.MLFLOW_PASSWORD]}
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))  # CSRF key of this `up`
    return env


def auth_config(root: Path) -> Path:
    """The basic-auth app's config: users in mlruns/basic_auth.db; a user has no rights until granted some."""
    path = root / ".run" / "basic_auth.ini"
    path.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                    f"database_uri = sqlite:///{root / 'mlruns' / 'basic_auth.db'}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


def commands(root: Path, params_file: str, ep: Endpoints,
             env: dict[str, str] | None = None) -> dict[str, tuple[list[str], Path]]:
    """name -> (argv, working folder); MLflow with the basic-auth app when `env` (os.environ) turns auth on."""
    auth = ["--app-name", "basic-auth"] if security.mlflow_auth(os.environ if env is None else env) else []
    bin_dir = Path(sys.executable).parent
    mlruns = root / "mlruns"
    allowed = ",".join(f"{h}:{ep.mlflow_port}" for h in (ep.host, "localhost", "127.0.0.1"))
    return {
        "prefect": ([str(bin_dir / "prefect"), "server", "start", "--host", ep.host, "--port", str(ep.prefect_port)],
                    root),
        "mlflow": ([str(bin_dir / "mlflow"), "server", "--host", ep.host, "--port", str(ep.mlflow_port),
                    "--workers", "1", "--backend-store-uri", f"sqlite:///{mlruns / 'mlflow.db'}",
                    "--serve-artifacts", "--artifacts-destination", str(mlruns / "artifacts"),
                    "--allowed-hosts", allowed, "--cors-allowed-origins", ep.mlflow_ui, *auth], root),
        "serve": ([sys.executable, "-m", "flows.serve", "--project-dir", str(root), "--params", params_file], CODE),
        "endpoint": ([sys.executable, "-m", "ottimo.cli", "serve", "-C", str(root), "-p", params_file,
                      "--port", str(ep.serve_port)], CODE),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _outside_group(pid: int) -> list[psutil.Process]:
    """The descendants of `pid` that are not in its process group (a signal to the group misses them)."""
    found = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(child.pid) != pid:
                found.append(child)
    return found


def _pid(run_dir: Path, name: str) -> int | None:
    f = run_dir / f"{name}.pid"
    if not f.is_file():
        return None
    pid = int(f.read_text().strip())
    return pid if _alive(pid) else None


def _get(url: str, body: dict | None = None) -> object | None:
    """JSON from url (POST when body is given; True for a 2xx that is not JSON), None while it is not answering."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if auth := os.environ.get(security.PREFECT_CLIENT_AUTH) or os.environ.get(security.PREFECT_SERVER_AUTH):
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw = resp.read()
    except OSError:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return True


def answers(url: str) -> bool:
    """Whether anything answers HTTP at `url` (an error status counts: the server is up)."""
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def ready(name: str, ep: Endpoints) -> bool:
    if name == "prefect":
        return _get(f"{ep.prefect_api}/health") is not None
    if name == "mlflow":
        return _get(f"{ep.mlflow_ui}/health") is not None
    if name == "endpoint":  # any answer: 200 serving, 503 while no champion exists yet (it follows when one does)
        return answers(f"{ep.endpoint}/health")
    deployments = _get(f"{ep.prefect_api}/deployments/filter", {"limit": 10})
    return isinstance(deployments, list) and len(deployments) >= 2


def start(run_dir: Path, name: str, argv: list[str], cwd: Path, env: dict[str, str], ready: Callable[[], bool],
          timeout: float) -> None:
    """Start `name` unless .run/<name>.pid names a live process, and wait until `ready()`; its output goes to
    .run/<name>.log, its pid to .run/<name>.pid, and it runs in a session of its own (`down` stops the group)."""
    proc = None
    if _pid(run_dir, name) is None:
        with open(run_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        (run_dir / f"{name}.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not ready():
        if (proc.poll() is not None) if proc else _pid(run_dir, name) is None:
            raise RuntimeError(f"{name} exited while starting; see {run_dir / name}.log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not answer within {timeout:.0f} s; see {run_dir / name}.log")
        time.sleep(0.5)


def record_order(run_dir: Path, stack: str, names: list[str]) -> None:
    """What `down` stops, newest first: the names this `up` started, after those an earlier `up` recorded."""
    path = run_dir / STACK_FILE
    known = json.loads(path.read_text())["order"] if path.is_file() else []
    path.write_text(json.dumps({"stack": stack, "order": known + [n for n in names if n not in known]}))


def up(root: Path, params_file: str = "params.yaml", timeout: float = 180, names: tuple[str, ...] = ORDER) -> Endpoints:
    """Start whatever of `names` (all four by default) is not running yet, each after the one before answers."""
    root = root.resolve()
    ep = endpoints(root, params_file)
    run_dir = root / ".run"
    run_dir.mkdir(exist_ok=True)
    (root / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    sqlite_store.seed(root / "mlruns" / "mlflow.db")  # the MLflow server's store (commands()): not made from scratch
    env = environment(root, ep)
    if security.mlflow_auth(env):
        auth_config(root)
    started = [n for n in ORDER if n in names]
    record_order(run_dir, "embedded", started)
    for name, (argv, cwd) in commands(root, params_file, ep, env).items():
        if name in started:
            start(run_dir, name, argv, cwd, env, lambda n=name: ready(n, ep), timeout)
    return ep


def stop(run_dir: Path, name: str, grace: float = 20) -> bool:
    """SIGTERM the process group of .run/<name>.pid, SIGKILL it after `grace` seconds; False when none ran."""
    pid = _pid(run_dir, name)
    if pid is None:
        (run_dir / f"{name}.pid").unlink(missing_ok=True)
        return False
    others = _outside_group(pid)  # a Prefect worker's flow runs: in sessions of their own, stopped as well
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for proc in others:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child (tests)
        except ChildProcessError:
            pass
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    for proc in psutil.wait_procs(others, timeout=max(0.0, deadline - time.monotonic()))[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    (run_dir / f"{name}.pid").unlink(missing_ok=True)
    return True


def down(root: Path, grace: float = 20) -> list[str]:
    """Stop what `up` started (.run/stack.json, else the embedded four), newest first; keep all data."""
    run_dir = root.resolve() / ".run"
    path = run_dir / STACK_FILE
    order = json.loads(path.read_text())["order"] if path.is_file() else list(ORDER)
    stopped = []
    for name in reversed(order):
        if name == "postgres":  # the team stack's pg_ctl cluster: `pg_ctl stop -m fast`, not a signal to a group
            from ottimo.ops.postgres import stop_cluster

            if stop_cluster(run_dir / "postgres"):
                stopped.append(name)
        elif stop(run_dir, name, grace):
            stopped.append(name)
    path.unlink(missing_ok=True)
    return stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    root = Path(args.project_dir)
    if args.action == "down":
        stopped = down(root)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'} (data kept in .run/, .prefect/ and mlruns/)")
        return
    summary(root, up(root, args.params))


def summary(root: Path, ep: Endpoints) -> None:
    print(f"Prefect UI  {ep.prefect_ui}   (deployments: {ep.prefect_ui}/deployments)\n"
          f"MLflow UI   {ep.mlflow_ui}   (registry: {ep.mlflow_ui}/#/models)\n"
          f"endpoint    {ep.endpoint}/predict   (the champion; GET {ep.endpoint}/model)\n"
          f"logs and pids in {root.resolve() / '.run'}; stop with `make down`")


if __name__ == "__main__":
    main()
