"""The task runner of a fan-out stage (tuning trials, compression variants): threads, or a Dask cluster through
prefect-dask.

`<stage>.runner: dask` sends the stage's tasks to the scheduler at `<stage>.dask_address`, else at
OTTIMO_DASK_ADDRESS (what `make up STACK=postgres` sets for its Prefect workers), else to a LocalCluster of
`<stage>.n_jobs` one-thread worker processes started for the flow run. Before the flow run's first task, a
scheduler given by address must answer within seconds with workers that see the project folder and write to this
flow's MLflow store; before each submission, the task and its arguments must pickle (ottimo.ops.preflight). A
failure names the address or the object and what to do (tasks/dask_runner.py).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from ottimo.config import CompressCfg, Params, TuneCfg
from ottimo.ops import dask_cluster, preflight
from ottimo.registry import tracking

ADDRESS_ENV = "OTTIMO_DASK_ADDRESS"
Stage = Literal["tune", "compress"]


def dask_address(cfg: TuneCfg | CompressCfg, stage: Stage) -> tuple[str | None, str]:
    """(The scheduler address, the setting it came from): `<stage>.dask_address`, else OTTIMO_DASK_ADDRESS; None
    when neither is set (a LocalCluster then)."""
    if cfg.dask_address:
        return cfg.dask_address, f"{stage}.dask_address"
    return os.environ.get(ADDRESS_ENV) or None, ADDRESS_ENV


def task_runner(root: Path, params: Params, stage: Stage) -> TaskRunner:
    """`<stage>.n_jobs` threads, or a pre-flighted DaskTaskRunner: the scheduler at dask_address / OTTIMO_DASK_ADDRESS,
    else a LocalCluster of n_jobs one-thread worker processes on 127.0.0.1."""
    cfg: TuneCfg | CompressCfg = getattr(params, stage)
    if cfg.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.n_jobs)
    from tasks.dask_runner import CheckedDaskTaskRunner  # distributed is imported only when asked for

    address, source = dask_address(cfg, stage)
    if address:
        return CheckedDaskTaskRunner(address=address, stage=stage, source=source, probes=probes(root, params))
    return CheckedDaskTaskRunner(stage=stage, cluster_kwargs={
        "n_workers": cfg.n_jobs, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",  # no dashboard without bokeh; /health and /metrics on loopback
        "config": dask_cluster.worker_config()})  # no profiler thread, slower ticks: as `make up`'s workers


def probes(root: Path, params: Params) -> tuple[preflight.Probe, ...]:
    """What a worker of a scheduler given by address must see as this flow does: the project folder (tasks pass
    paths under it), then the MLflow store (OTTIMO_TRACKING_URI, else mlflow.tracking_uri from the project)."""
    return (
        preflight.Probe("the project folder", functools.partial(os.path.isdir, str(root)), True,
                        f"tasks read and write files under {root}: run the workers on this machine, or mount the "
                        "project at the same path on theirs"),
        preflight.Probe("the MLflow store", functools.partial(tracking.tracking_uri, root, params.mlflow),
                        tracking.tracking_uri(root, params.mlflow),
                        "start the workers with this flow's OTTIMO_TRACKING_URI (or unset it on both sides)",
                        show=lambda v: repr(tracking.redact(str(v)))),
    )
