"""Flow runs per minute through a Prefect process work pool with 1 vs 2 workers (bench/scale.py --part prefect).

A real `prefect server` on 127.0.0.1 (its own temporary PREFECT_HOME), a process work pool, and a deployment of
`work` below: one flow run trains a small MLP on digits for a fixed number of epochs, on one torch thread. Each
round submits `runs` flow runs at once and times them from the first submission until the last is Completed,
with 1 worker and then with 2 (the order alternates between rounds). Workers poll every second
(PREFECT_WORKER_QUERY_SECONDS=1; the default, 10 s, would be most of what is measured).

    .venv/bin/python bench/prefect_scale.py --rounds 2 --runs 4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefect import Flow, flow

HERE = Path(__file__).resolve().parent
POOL = "bench-pool"


@flow(name="bench-work")
def work(epochs: int = 60, seed: int = 0) -> float:
    """The unit of work: a seeded MLP trained on digits, one torch thread; returns its training accuracy."""
    import torch
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return float((model(x).argmax(1) == y).float().mean())


def _env(home: str, port: int) -> dict[str, str]:
    return os.environ | {"PREFECT_HOME": home, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                         "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1",
                         "PYTHONPATH": os.pathsep.join(filter(None, (str(HERE.parent), os.environ.get("PYTHONPATH"))))}


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=HERE,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _batch(client, deployment_id, runs: int, epochs: int) -> float:
    """Submit `runs` flow runs at once; seconds until all are Completed."""
    t0 = time.perf_counter()
    ids = [client.create_flow_run_from_deployment(deployment_id, parameters={"epochs": epochs, "seed": i}).id
           for i in range(runs)]
    while True:
        states = [client.read_flow_run(i).state for i in ids]
        if bad := [s for s in states if s.is_final() and not s.is_completed()]:
            sys.exit(f"a bench flow run ended {bad[0].type.value}: {bad[0].message}")
        if all(s.is_completed() for s in states):
            return time.perf_counter() - t0
        time.sleep(0.5)


def run(rounds: int = 2, runs: int = 4, epochs: int = 60) -> list[dict]:
    """Rows {workers, round, seconds, runs_per_min}, measured with 1 and 2 workers, alternating."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from ottimo.ops.postgres import free_port

    home = tempfile.mkdtemp(prefix="ottimo-bench-prefect-")
    port = free_port()
    env = _env(home, port)
    logs = Path(home)
    server = _spawn([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                     str(port)], env, logs / "server.log")
    rows: list[dict] = []
    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_HOME: home}), \
                get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(Exception):
                    client.hello()
                    break
                if time.monotonic() > deadline:
                    sys.exit(f"prefect server did not answer within 120 s; see {logs / 'server.log'}")
                time.sleep(0.5)
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
            source = Flow.from_source(source=str(HERE), entrypoint="prefect_scale.py:work")
            deployment_id = source.to_deployment(name="bench").apply(work_pool_name=POOL)
            for r in range(rounds):
                for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                    workers = [_spawn([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name",
                                       f"bench-{n}-{i}", "--type", "process", "--limit", "1"], env,
                                      logs / f"worker-{i}.log") for i in range(n)]
                    try:
                        time.sleep(3)  # the workers' first poll
                        seconds = _batch(client, deployment_id, runs, epochs)
                    finally:
                        for w in workers:
                            _stop(w)
                    rows.append({"workers": n, "round": r + 1, "seconds": seconds,
                                 "runs_per_min": runs * 60 / seconds})
                    print(f"  round {r + 1}: {n} worker(s), {runs} flow runs in {seconds:.1f} s", flush=True)
    finally:
        _stop(server)
        shutil.rmtree(home, ignore_errors=True)
    return rows


def report(rows: list[dict]) -> str:
    one = [r["runs_per_min"] for r in rows if r["workers"] == 1]
    two = [r["runs_per_min"] for r in rows if r["workers"] == 2]
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    return (f"| Prefect workers | flow runs / min (median [min–max]) |\n| --- | --- |\n"
            f"| 1 | {statistics.median(one):.2f} [{min(one):.2f}–{max(one):.2f}] |\n"
            f"| 2 | {statistics.median(two):.2f} [{min(two):.2f}–{max(two):.2f}] |\n"
            f"2 workers vs 1: {statistics.median(ratios):.2f}× [{min(ratios):.2f}–{max(ratios):.2f}] per round "
            f"(goal ≥ 1.7×, {os.cpu_count()} CPUs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=4, help="flow runs submitted at once per measurement")
    ap.add_argument("--epochs", type=int, default=60, help="training epochs per flow run (its work)")
    args = ap.parse_args()
    print(report(run(args.rounds, args.runs, args.epochs)))


if __name__ == "__main__":
    main()
