"""A Dask cluster as separate processes on this machine: the argv of a scheduler and of one-thread workers, all bound
to 127.0.0.1 with no dashboard, a wait until the scheduler answers with its workers, the name of the worker running
the current code, and a throw-away cluster (tests, benchmarks) that starts and stops exactly its own processes.

`make up` (ottimo/ops/stack.py) spawns the same argv with the same settings (ENV; a flow run's own LocalCluster gives
its workers the same, worker_config); flows reach the scheduler through prefect-dask (`tune.runner: dask`,
`compress.runner: dask`, tasks/runner.py). Processes are started with this interpreter (`python -m
distributed.cli.dask_scheduler` / `dask_worker`, what the `dask` command runs), so they import the same packages; run
them from the repository root or with it on PYTHONPATH, since workers import `tasks` and `ottimo`. Each worker runs
under a nanny, which restarts it if it dies and gives it OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
# Dask settings of every scheduler and worker started here (environment variables, as Dask reads them). With no
# dashboard there is nobody to show a worker's statistical profile to, yet its profiler thread would walk every
# thread's stack each 10 ms, taking the GIL from the task; the event-loop watchdog ticks every 20 ms and the system
# monitor every 500 ms in each process. Off / relaxed, an idle 2-worker cluster takes 3.7% of a core instead of 10.4%,
# and on a machine whose cores all train that is time the trials get back.
ENV = {"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
       "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "200ms",
       "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "2s"}


def worker_config() -> dict:
    """This process's `distributed` Dask config with ENV over it: what a LocalCluster passes to its workers (its
    `config` keyword), so the workers a flow run starts for itself run as `make up`'s do. Whole: a nanny sets each
    top-level key it is given in place of its own."""
    import dask.config  # the flow's process imports Dask only for a Dask runner

    return {"distributed": dask.config.merge(dask.config.get("distributed"),
                                             dask.config.collect_env(dict(ENV))["distributed"])}


def scheduler_argv(port: int, host: str = HOST, scheduler_file: Path | None = None) -> list[str]:
    """A scheduler on host:port (port 0: any free one; its address then goes to `scheduler_file`), no dashboard.
    --no-dashboard alone still serves /health and /metrics on 0.0.0.0:8787: that server is bound to host too."""
    argv = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", host, "--port", str(port),
            "--no-dashboard", "--dashboard-address", f"{host}:0"]
    return argv + (["--scheduler-file", str(scheduler_file)] if scheduler_file else [])


def worker_argv(address: str, local_dir: Path, name: str, host: str = HOST, death_timeout: int = 60) -> list[str]:
    """One worker process with one thread, named `name`, its spill files under local_dir/name, listening (worker,
    nanny and its /health server) on `host` only; it exits when the scheduler has been gone for `death_timeout`
    seconds."""
    return [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads", "1",
            "--host", host, "--no-dashboard", "--dashboard-address", f"{host}:0", "--name", name,
            "--local-directory", str(local_dir / name), "--death-timeout", str(death_timeout)]


def wait_ready(address: str, n_workers: int, timeout: float = 60) -> list[str]:
    """Wait until the scheduler at `address` answers and has `n_workers` workers (0: none needed); their addresses,
    sorted."""
    from distributed import Client

    deadline = time.monotonic() + timeout
    client = None
    while client is None:
        try:
            client = Client(address, timeout=max(1.0, min(5.0, deadline - time.monotonic())), set_as_default=False)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Dask scheduler answered at {address} within {timeout:.0f} s") from None
    with client:
        try:
            if n_workers:
                client.wait_for_workers(n_workers, timeout=max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            have = len(client.scheduler_info(n_workers=-1)["workers"])
            raise TimeoutError(f"the Dask scheduler at {address} has {have} of {n_workers} worker(s) after "
                               f"{timeout:.0f} s") from None
        return sorted(client.scheduler_info(n_workers=-1)["workers"])


def current_worker() -> str:
    """Who runs this code: the Dask worker's address (tcp://host:port) inside a Dask worker, else host:pid."""
    if "distributed" in sys.modules:  # only a process that imported Dask can be a Dask worker
        from distributed import get_worker

        try:
            return get_worker().address
        except ValueError:  # not in a worker
            pass
    return f"{os.uname().nodename}:{os.getpid()}"


@dataclass(frozen=True)
class Throwaway:
    address: str  # tcp://127.0.0.1:<port>
    workers: list[str]  # their addresses
    pids: list[int]  # scheduler first; each worker's nanny (its worker process is the nanny's child)
    folder: Path  # logs (<name>.log) and worker directories


def _scheduler_address(path: Path, proc: subprocess.Popen, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        if path.is_file():
            try:
                return json.loads(path.read_text())["address"]
            except (ValueError, KeyError):
                pass  # being written
        if proc.poll() is not None:
            raise RuntimeError(f"the Dask scheduler exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Dask scheduler wrote no address within {timeout:.0f} s; see {log}")
        time.sleep(0.1)


def stop(procs: list[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM each process's group (a worker's nanny and its worker), then SIGKILL what is left after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if all(p.poll() is not None for p in procs):
            return


@contextmanager
def throwaway(folder: Path, n_workers: int, env: Mapping[str, str] | None = None,
              timeout: float = 120) -> Iterator[Throwaway]:
    """A scheduler on a free loopback port and `n_workers` one-thread workers, each in its own session with its
    output in folder/<name>.log; stopped (exactly these process groups) on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env) | ENV
    procs: list[subprocess.Popen] = []

    def spawn(argv: list[str], name: str) -> subprocess.Popen:
        with open(folder / f"{name}.log", "ab") as log:
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        return procs[-1]

    try:
        sched_file = folder / "scheduler.json"
        sched_file.unlink(missing_ok=True)
        scheduler = spawn(scheduler_argv(0, scheduler_file=sched_file), "scheduler")
        address = _scheduler_address(sched_file, scheduler, folder / "scheduler.log", timeout)
        for i in range(n_workers):
            spawn(worker_argv(address, folder, f"worker-{i}"), f"worker-{i}")
        workers = wait_ready(address, n_workers, timeout)
        yield Throwaway(address, workers, [p.pid for p in procs], folder)
    finally:
        stop(procs)
