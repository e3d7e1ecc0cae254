"""Tuning trials and compression variants on a real Dask cluster: a scheduler and two one-thread worker processes
(ottimo.ops.dask_cluster, the argv `make up` uses) on free loopback ports, reached by address through prefect-dask
under a real Prefect API and MLflow store. Both flows complete and both workers did work (the `ottimo.worker` tag of
the trial and variant runs); nothing listens beyond 127.0.0.1; the pre-flight fails in seconds, naming what is
wrong: a scheduler with no workers, workers that would log to another MLflow store, an argument that cannot be
pickled, an address where no scheduler answers. A flow run's own LocalCluster gives its workers the settings
`make up`'s workers start with."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
from prefect import flow, task

from flows.compress import compress_stage
from ottimo import vocab
from ottimo.config import deep_merge, load_params
from ottimo.data.tables import materialise_raw, prepare
from ottimo.ops import dask_cluster, preflight
from ottimo.registry.tracking import connect
from tasks.dask_runner import CheckedDaskTaskRunner
from tasks.data import DataVersion
from tasks.evaluate import export_candidate
from tasks.runner import probes
from tasks.train import start_pipeline_run, train_candidate
from tests.conftest import seeded_harness, write_project

REV = "0123abcd"  # the data revision of projects prepared here without DVC


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dask")
    env = os.environ | {"PREFECT_HOME": str(folder / "prefect")}  # nothing of the workers in ~/.prefect
    with dask_cluster.throwaway(folder, 2, env) as c:
        yield c


@pytest.fixture(scope="module")
def harness(prefect_db):
    with seeded_harness(prefect_db, timeout=90):
        yield


def project(tmp_path: Path, overrides: dict) -> tuple[Path, DataVersion]:
    """A project on the MLP (TINY settings plus `overrides`), its data prepared without DVC."""
    root = write_project(tmp_path / "project", deep_merge({"train": {"candidates": ["mlp"]}}, overrides))
    params = load_params(root / "params.yaml")
    materialise_raw(root, params.data)
    prepare(root, params.data, root / "data" / "prepared")
    return root, DataVersion(REV, str(root / "data" / "prepared"), True)


def listening(c: dask_cluster.Throwaway) -> set[str]:
    """The IPs the cluster's processes (scheduler, nannies, their worker processes) listen on."""
    ips = set()
    for pid in c.pids:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            ips |= {conn.laddr.ip for conn in p.net_connections("inet") if conn.status == psutil.CONN_LISTEN}
    return ips


def test_the_cluster_listens_on_loopback_only(cluster):
    assert len(cluster.workers) == 2 and cluster.address.startswith("tcp://127.0.0.1:")
    assert listening(cluster) == {"127.0.0.1"}


@pytest.mark.slow  # about 50 s with its cluster and harness; its compression twin below is slow too
def test_tuning_trials_fan_out_to_both_workers(tmp_path, cluster, harness):
    from flows.tune import with_runner

    root, data = project(tmp_path, {"tune": {"runner": "dask", "dask_address": cluster.address, "n_jobs": 2,
                                             "n_trials": 4}, "families": {"mlp": {"trial_epochs": 2}}})
    state = with_runner(str(root))(project_dir=str(root), data=data, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()["mlp"]
    assert result.complete + result.pruned == 4
    client, exp = connect(root, load_params(root / "params.yaml").mlflow)
    trials = client.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.TRIAL}'")
    assert len(trials) == 4 and {r.data.tags[vocab.PARENT] for r in trials} == {result.mlflow_run_id}
    assert {r.data.tags[vocab.WORKER] for r in trials} == set(cluster.workers)  # both workers trained trials


@flow
def train_then_compress(project_dir: str, data: DataVersion) -> str:
    """The pipeline's path into compression, shortened: its run, the MLP trained and exported, compress_stage."""
    root = Path(project_dir)
    params = load_params(root / "params.yaml")
    run_id = start_pipeline_run(root, params, data)
    cand = train_candidate(root, params, "mlp", data, run_id)
    compress_stage(project_dir, "params.yaml", params, [cand], [export_candidate(root, params, cand, data)], data,
                   run_id, None)
    return run_id


@pytest.mark.slow  # 12 s on a quiet machine, about 60 s on a busy one
def test_compression_variants_fan_out_to_both_workers_and_are_measured_here(tmp_path, cluster, harness):
    compress = {"enabled": True, "teacher": "mlp", "bases": ["teacher"], "distill": {"enabled": False},
                "prune": {"unstructured": [0.5], "structured": [0.5], "finetune_epochs": 2},
                "quantize": {"options": ["int8-dyn"], "min_agreement": 0.5},
                "select": {"max_drop_vs_teacher": 50.0, "min_accuracy": 0.3},
                "runner": "dask", "dask_address": cluster.address}
    root, data = project(tmp_path, {"compress": compress, "gate": {"min_accuracy": 0.3}})
    state = train_then_compress(str(root), data, return_state=True)
    assert state.is_completed(), state.message
    client, exp = connect(root, load_params(root / "params.yaml").mlflow)
    runs = client.search_runs([exp], f"tags.`{vocab.PARENT}` = '{state.result()}' and "
                                     f"tags.`{vocab.KIND}` = '{vocab.COMPRESSED}'")
    # the last one is quantized from the structurally pruned variant: a worker's result handed on to another task
    assert {r.info.run_name for r in runs} == {"mlp+prune-u50", "mlp+prune-s50", "mlp+int8-dyn",
                                               "mlp+prune-s50+int8-dyn"}
    assert {r.data.tags[vocab.WORKER] for r in runs} == set(cluster.workers)  # both workers built variants
    for r in runs:  # measured and closed by the flow's process, after the workers built them
        assert r.info.status == "FINISHED" and {"test_accuracy", "test_p95_ms"} <= set(r.data.metrics)
    assert listening(cluster) == {"127.0.0.1"}  # still, after the workers ran Prefect, MLflow and torch


def test_workers_that_would_log_elsewhere_or_cannot_see_the_project_are_refused(tmp_path, cluster, monkeypatch):
    root = write_project(tmp_path / "project")
    params = load_params(root / "params.yaml")
    monkeypatch.setenv("OTTIMO_TRACKING_URI", "http://ottimo:s3cret@127.0.0.1:5999")  # this process only
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check_scheduler(cluster.address, "tune.dask_address", "tune.runner", 5, probes(root, params))
    message = str(err.value)
    assert message.startswith(f"Dask worker {cluster.workers[0]} sees the MLflow store as 'sqlite:///{root}/mlruns/")
    assert "this flow as 'http://***@127.0.0.1:5999': start the workers with this flow's OTTIMO_TRACKING_URI" in message
    assert "s3cret" not in message
    with pytest.raises(preflight.PreflightError, match=f"sees the project folder as False, this flow as True: tasks "
                                                       f"read and write files under {tmp_path}/elsewhere"):
        preflight.check_scheduler(cluster.address, "tune.dask_address", "tune.runner", 5,
                                  probes(tmp_path / "elsewhere", params))
    monkeypatch.delenv("OTTIMO_TRACKING_URI")
    assert preflight.check_scheduler(cluster.address, "x", "tune.runner", 5, probes(root, params)) == cluster.workers


def test_a_scheduler_without_workers_is_refused_in_seconds(tmp_path):
    with dask_cluster.throwaway(tmp_path / "dask", 0) as lonely:
        t0 = time.monotonic()
        with pytest.raises(preflight.PreflightError) as err:
            preflight.check_scheduler(lonely.address, "OTTIMO_DASK_ADDRESS", "compress.runner", timeout=3)
        assert time.monotonic() - t0 < 15
    assert str(err.value) == (f"the Dask scheduler at {lonely.address} (OTTIMO_DASK_ADDRESS) has no workers: submitted "
                              f"tasks would wait forever. Start workers (`dask worker {lonely.address} --nthreads 1`) "
                              "or set compress.runner: threads.")


@task
def hold(lock) -> int:
    return 1


@flow
def sends_a_lock() -> int:
    return hold.submit(threading.Lock()).result()


def test_the_flow_fails_in_seconds_with_the_object_or_the_address_named(tmp_path, cluster, harness):
    from flows.tune import with_runner

    runner = CheckedDaskTaskRunner(address=cluster.address, stage="tune", source="tune.dask_address")
    t0 = time.monotonic()
    state = sends_a_lock.with_options(task_runner=runner)(return_state=True)
    assert state.is_failed() and time.monotonic() - t0 < 30
    assert "task hold cannot be sent to a Dask worker: argument `lock` holds a _thread.lock that cannot be pickled" \
        in state.message

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"tcp://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    root, data = project(tmp_path, {"tune": {"runner": "dask", "dask_address": nowhere}})
    t0 = time.monotonic()
    state = with_runner(str(root))(project_dir=str(root), data=data, return_state=True)
    assert state.is_failed() and time.monotonic() - t0 < 30  # Failed, not left Running
    assert f"no Dask scheduler answers at '{nowhere}' (tune.dask_address) within 5 s" in state.message


KEYS = ("distributed.worker.profile.enabled", "distributed.admin.tick.interval",
        "distributed.admin.system-monitor.interval")


def settings(client) -> set[tuple]:
    """The KEYS' values in each worker of the client's cluster, one tuple a worker."""
    import dask.config

    per_key = [client.run(dask.config.get, key) for key in KEYS]  # {worker: value} each
    return {tuple(values[w] for values in per_key) for w in per_key[0]}


def test_a_flow_runs_own_local_cluster_gives_its_workers_the_settings_of_make_ups(tmp_path, cluster, monkeypatch):
    import dask.config
    from distributed import Client, LocalCluster

    from ottimo.config import parse_params
    from tasks.runner import ADDRESS_ENV, task_runner

    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    runner = task_runner(tmp_path, parse_params({"tune": {"runner": "dask", "n_jobs": 1}}), "tune")
    assert runner.address is None  # a LocalCluster, started the way prefect-dask starts it: cluster_kwargs
    with LocalCluster(**runner.cluster_kwargs) as local, Client(local) as client:
        local_settings = settings(client)
    with Client(cluster.address) as client:
        stack_settings = settings(client)
    assert stack_settings == local_settings == {(False, "200ms", "2s")}
    assert dask.config.get("distributed.worker.profile.enabled") is True  # this process's Dask config is untouched
