"""The Dask pre-flight (ottimo.ops.preflight) and the runner choice (tasks/runner.py), without a cluster: what cannot be
pickled is found and named (a lock in a record, a lambda closing over a lock, a file open for writing, a task whose
function names a module-global lock), what can is let through (the records tasks pass, a plain lambda, every task of
the fan-out stages), and a scheduler that is not there fails in seconds with its address and what to do."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prefect import task
from prefect.task_runners import ThreadPoolTaskRunner

from ottimo.config import Params, parse_params
from ottimo.ops import dask_cluster, preflight
from ottimo.ops.postgres import free_port
from ottimo.spec import InputSpec
from tasks import compress, tune
from tasks.compress import Built
from tasks.data import DataVersion
from tasks.runner import ADDRESS_ENV, dask_address, task_runner

LOCK = threading.Lock()


@dataclass(frozen=True)
class Record:
    name: str
    extra: dict = field(default_factory=dict)
    hook: object = None


@task
def uses_module_lock(x: int) -> int:
    with LOCK:  # a module global: the task's function travels by value and takes it along
        return x


def refused(arguments: dict, fn: object | None = None, name: str = "prune_variant") -> str:
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check_picklable(name, fn, arguments, "compress.runner")
    return str(err.value)


def test_a_lock_in_a_record_is_named_with_its_path_and_type():
    message = refused({"params": Params(), "base": Record("teacher", {"guard": threading.Lock()})})
    assert message.startswith("task prune_variant cannot be sent to a Dask worker: argument `base` holds a "
                              "_thread.lock at `base.extra['guard']` that cannot be pickled (TypeError: cannot "
                              "pickle '_thread.lock' object).")
    assert "Pass what a worker can rebuild it from" in message and message.endswith("set compress.runner: threads.")


def test_a_lambda_in_a_record_travels_but_not_the_lock_it_closes_over():
    preflight.check_picklable("t", None, {"base": Record("x", hook=lambda v: v + 1)}, "tune.runner")  # cloudpickle
    lock = threading.RLock()
    message = refused({"base": Record("x", hook=lambda: lock.acquire())})
    assert "argument `base` holds a _thread.RLock at `base.hook.<closure lock>`" in message


def test_a_file_open_for_writing_is_named(tmp_path):
    with open(tmp_path / "log.txt", "w") as handle:
        message = refused({"settings": {"log": handle}})
    assert "argument `settings` holds a _io.TextIOWrapper at `settings['log']`" in message
    assert "Cannot pickle files that are not opened for reading: w" in message


def test_a_task_whose_function_names_a_module_global_lock_is_refused():
    message = refused({"x": 1}, uses_module_lock, uses_module_lock.name)
    assert message.startswith("task uses_module_lock cannot be sent to a Dask worker: ")
    assert ("the task's function refers to a _thread.lock at `uses_module_lock.__wrapped__.<global LOCK>`"
            in message)
    assert "through their module (`module.name`)" in message


def test_every_fan_out_task_and_the_records_they_take_pickle():
    spec = InputSpec("tabular", (64,), "float32")
    built = Built("transformer", "trained", "", "transformer", "r1", "/m.onnx", "ab", "models:/m-1", spec, 10,
                  "/c.pt", None, 100)
    args = {"root": Path("/p"), "params": parse_params({}), "base": built, "data": DataVersion("rev", "/p/d", True)}
    for t in (compress.distill_student, compress.prune_variant, compress.quantize_variant, compress.fuse_variant,
              tune.run_trials):
        preflight.check_picklable(t.name, t, args, "compress.runner")  # raises if not


def test_no_scheduler_at_the_address_fails_in_seconds_with_the_address_and_what_to_do():
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check_scheduler(address, "tune.dask_address", "tune.runner", timeout=2)
    assert time.monotonic() - t0 < 10
    message = str(err.value)
    assert message.startswith(f"no Dask scheduler answers at '{address}' (tune.dask_address) within 2 s")
    assert "dask scheduler --host 127.0.0.1" in message and "or set tune.runner: threads." in message
    with pytest.raises(preflight.PreflightError, match="no Dask scheduler answers at 'not an address'"):
        preflight.check_scheduler("not an address", "OTTIMO_DASK_ADDRESS", "compress.runner", timeout=2)


def test_the_address_comes_from_the_stage_then_the_environment_then_a_local_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    params = parse_params({"tune": {"runner": "dask", "n_jobs": 3}, "compress": {"runner": "dask",
                                                                                 "dask_address": "tcp://10.0.0.5:8786"}})
    assert dask_address(params.tune, "tune") == (None, ADDRESS_ENV)
    local = task_runner(tmp_path, params, "tune")
    assert local.address is None and local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_kwargs["threads_per_worker"] == 1 and local.cluster_kwargs["host"] == "127.0.0.1"
    monkeypatch.setenv(ADDRESS_ENV, "tcp://127.0.0.1:8786")
    assert dask_address(params.tune, "tune") == ("tcp://127.0.0.1:8786", ADDRESS_ENV)
    assert dask_address(params.compress, "compress") == ("tcp://10.0.0.5:8786", "compress.dask_address")
    runner = task_runner(tmp_path, params, "compress")
    assert (runner.address, runner.source, runner.stage) == ("tcp://10.0.0.5:8786", "compress.dask_address", "compress")
    copy = runner.duplicate()  # what Prefect runs each flow run with
    assert (type(copy), copy.address, copy.source, copy.probes) == (type(runner), runner.address, runner.source,
                                                                    runner.probes)
    assert [p.what for p in runner.probes] == ["the project folder", "the MLflow store"]
    assert isinstance(task_runner(tmp_path, parse_params({}), "compress"), ThreadPoolTaskRunner)  # the default


def test_processes_are_bound_to_loopback_without_a_dashboard(tmp_path):
    sched = dask_cluster.scheduler_argv(8786)
    worker = dask_cluster.worker_argv("tcp://127.0.0.1:8786", tmp_path, "worker-0")
    for argv in (sched, worker):
        assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--no-dashboard" in argv
        assert argv[argv.index("--dashboard-address") + 1] == "127.0.0.1:0"  # /health, /metrics: else 0.0.0.0:8787
    assert worker[worker.index("--nthreads") + 1] == "1" and worker[worker.index("--nworkers") + 1] == "1"
    assert worker[worker.index("--local-directory") + 1] == str(tmp_path / "worker-0")
    assert dask_cluster.current_worker().endswith(f":{__import__('os').getpid()}")  # not in a Dask worker
