"""`make up STACK=postgres WORKERS=n`: the team stack, every part on deploy.host (127.0.0.1), in this order:

    postgres          a PostgreSQL cluster in .run/postgres (generated password in a 0600 file, clients read
                      .run/postgres.pgpass through PGPASSFILE: no URL holds it); databases prefect, mlflow, optuna
    s3                moto's S3 API, standing in for S3 / MinIO (ottimo.ops.s3): MLflow artifacts, the DVC remote
    prefect           the Prefect server on Postgres
    mlflow            the MLflow server on Postgres, artifacts proxied to s3://<bucket>/mlflow
    dask-scheduler    the Dask scheduler, and dask-worker-1..n (one thread each): tune/compress runner: dask
    (deployments)     the deployments registered to the process work pool `team.work_pool` (flows/serve.py --pool)
    prefect-worker-1..n   the Prefect workers polling the pool: scheduled and UI-triggered runs execute there
    endpoint          `ottimo serve`, the champion on /predict

The flow runs (on the Prefect workers) and the Dask workers find the rest through the environment set here:
OTTIMO_TRACKING_URI (MLflow), OTTIMO_OPTUNA_STORAGE (Optuna on Postgres), OTTIMO_DVC_REMOTE_URL (the DVC remote on
the bucket), OTTIMO_DASK_ADDRESS (the scheduler), AWS_ENDPOINT_URL_S3 and MLFLOW_S3_ENDPOINT_URL (the local S3
API), PGPASSFILE. On a team's own infrastructure the same variables point at managed Postgres, S3 and a Dask
cluster (README "Run it on a team's infrastructure"). `make down` stops exactly these (ottimo.ops.servers.down).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ottimo.config import TeamCfg, load_params
from ottimo.ops import dask_cluster, s3, servers
from ottimo.ops.postgres import Cluster

DATABASES = ("prefect", "mlflow", "optuna")
# the environment variables that tell a flow run where the team's services are (documented in the README)
TRACKING, OPTUNA, DVC_REMOTE, DASK = ("OTTIMO_TRACKING_URI", "OTTIMO_OPTUNA_STORAGE", "OTTIMO_DVC_REMOTE_URL",
                                      "OTTIMO_DASK_ADDRESS")


@dataclass(frozen=True)
class Team:
    ep: servers.Endpoints
    cfg: TeamCfg
    workers: int
    postgres_port: int
    s3_port: int
    dask_port: int

    @property
    def s3_url(self) -> str:
        return s3.endpoint(self.ep.host, self.s3_port)

    @property
    def dask_address(self) -> str:
        return f"tcp://{self.ep.host}:{self.dask_port}"

    @property
    def concurrency(self) -> int:
        return self.cfg.pool_concurrency or self.workers

    def worker_names(self, kind: str) -> list[str]:
        return [f"{kind}-worker-{i}" for i in range(1, self.workers + 1)]


def team(root: Path, params_file: str = "params.yaml", workers: int | None = None) -> Team:
    """deploy.team from params.yaml; WORKERS and the ports' OTTIMO_POSTGRES_PORT / OTTIMO_S3_PORT /
    OTTIMO_DASK_PORT override it."""
    cfg = load_params(root / params_file).deploy.team
    n = workers or int(os.environ.get("WORKERS") or cfg.workers)
    return Team(servers.endpoints(root, params_file), cfg, n,
                int(os.environ.get("OTTIMO_POSTGRES_PORT") or cfg.postgres_port),
                int(os.environ.get("OTTIMO_S3_PORT") or cfg.s3_port),
                int(os.environ.get("OTTIMO_DASK_PORT") or cfg.dask_port))


def cluster(root: Path, t: Team) -> Cluster:
    return Cluster(root / ".run" / "postgres", t.postgres_port, host=t.ep.host)


def environment(root: Path, t: Team, pg: Cluster) -> dict[str, str]:
    """What every process of the stack sees: the embedded stack's environment, and where the team's parts are."""
    env = servers.environment(root, t.ep)
    pythonpath = os.pathsep.join(p for p in (str(servers.CODE), env.get("PYTHONPATH")) if p)
    return env | pg.env() | s3.client_env(t.s3_url, env) | {
        OPTUNA: pg.url("optuna"), DVC_REMOTE: f"s3://{t.cfg.bucket}/dvc", DASK: t.dask_address,
        "PYTHONPATH": pythonpath}  # Dask workers import flows/ and tasks/ as the flow runs do


def commands(root: Path, params_file: str, t: Team, pg: Cluster) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (argv, environment additions), in start order (postgres is a pg_ctl cluster, not listed)."""
    bin_dir = Path(sys.executable).parent
    embedded = servers.commands(root, params_file, t.ep, {})
    mlflow = embedded["mlflow"][0]
    mlflow[mlflow.index("--backend-store-uri") + 1] = pg.url("mlflow")
    mlflow[mlflow.index("--artifacts-destination") + 1] = f"s3://{t.cfg.bucket}/mlflow"
    local = root / ".run" / "dask"
    out = {
        "s3": (s3.argv(t.ep.host, t.s3_port), s3.server_env(root / ".run")),
        "prefect": (embedded["prefect"][0], {"PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "asyncpg")}),
        "mlflow": (mlflow, {}),
        "dask-scheduler": (dask_cluster.scheduler_argv(t.dask_port, t.ep.host), dask_cluster.ENV),
    }
    for name in t.worker_names("dask"):
        out[name] = (dask_cluster.worker_argv(t.dask_address, local, name, t.ep.host), dask_cluster.ENV)
    for name in t.worker_names("prefect"):
        out[name] = ([str(bin_dir / "prefect"), "worker", "start", "--pool", t.cfg.work_pool, "--name", name,
                      "--type", "process", "--limit", "1"], {})
    out["endpoint"] = (embedded["endpoint"][0], {})
    return out


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def dask_workers(address: str) -> int:
    """How many workers the scheduler at `address` has (0 while it does not answer)."""
    try:
        return len(dask_cluster.wait_ready(address, 0, timeout=5))
    except TimeoutError:
        return 0


def prefect_workers(t: Team) -> set[str]:
    """The names of the pool's workers that are ONLINE."""
    rows = servers._get(f"{t.ep.prefect_api}/work_pools/{t.cfg.work_pool}/workers/filter",
                        {"limit": 200, "offset": 0})  # explicit: the server refuses the client's null limit
    return {w["name"] for w in rows if w.get("status") == "ONLINE"} if isinstance(rows, list) else set()


def ready(name: str, t: Team):
    """A check that `name` answers (each worker: the scheduler or the pool knows it)."""
    if name == "s3":
        return lambda: servers.answers(t.s3_url)
    if name == "dask-scheduler":
        return lambda: _listening(t.ep.host, t.dask_port)
    if name.startswith("dask-worker-"):
        i = int(name.rsplit("-", 1)[1])
        return lambda: dask_workers(t.dask_address) >= i
    if name.startswith("prefect-worker-"):
        return lambda: name in prefect_workers(t)
    return lambda: servers.ready(name, t.ep)


def register_deployments(root: Path, params_file: str, t: Team, env: dict[str, str], timeout: float) -> None:
    """Create the work pool (concurrency limit) and register every deployment to it (flows/serve.py --pool)."""
    log = root / ".run" / "deployments.log"
    with open(log, "ab") as out:
        proc = subprocess.run([sys.executable, "-m", "flows.serve", "--project-dir", str(root), "--params",
                               params_file, "--pool", t.cfg.work_pool, "--concurrency", str(t.concurrency)],
                              cwd=servers.CODE, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"registering the deployments to work pool {t.cfg.work_pool} failed; see {log}")


def up(root: Path, params_file: str = "params.yaml", workers: int | None = None, timeout: float = 180) -> Team:
    """Start whatever part of the team stack is not running yet, each after the one before answers."""
    root = root.resolve()
    t = team(root, params_file, workers)
    run_dir = root / ".run"
    run_dir.mkdir(exist_ok=True)
    pg = cluster(root, t)
    cmds = commands(root, params_file, t, pg)
    servers.record_order(run_dir, "postgres", ["postgres", *cmds])
    pg.start(timeout=timeout)
    for db in DATABASES:
        pg.create_database(db)
    env = environment(root, t, pg)
    for name, (argv, extra) in cmds.items():
        if name == t.worker_names("prefect")[0]:
            register_deployments(root, params_file, t, env, timeout)
        fresh = name == "s3" and servers._pid(run_dir, "s3") is None
        servers.start(run_dir, name, argv, servers.CODE, env | extra, ready(name, t), timeout)
        if fresh:  # a new moto: first the requests of earlier `up`s, then the bucket if it is still missing
            s3.restore(t.s3_url, run_dir)
            s3.ensure_bucket(t.s3_url, t.cfg.bucket, env)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up"], help="`make down` (ottimo.ops.servers down) stops the stack")
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workers", type=int, help="Prefect and Dask workers (deploy.team.workers, env WORKERS)")
    args = parser.parse_args()
    root = Path(args.project_dir)
    t = up(root, args.params, args.workers)
    print(f"PostgreSQL  {t.ep.host}:{t.postgres_port}   (databases {', '.join(DATABASES)}; password in "
          f"{root.resolve() / '.run' / 'postgres.password'}, 0600)\n"
          f"S3 API      {t.s3_url}   (bucket {t.cfg.bucket}: MLflow artifacts mlflow/, DVC remote dvc/)\n"
          f"Dask        {t.dask_address}   ({t.workers} workers, one thread each)\n"
          f"work pool   {t.cfg.work_pool}   ({t.workers} Prefect workers, {t.concurrency} flow runs at once)")
    servers.summary(root, t.ep)


if __name__ == "__main__":
    main()
