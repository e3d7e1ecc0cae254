"""Reconcile at the pipeline's start: repair what a crashed or killed run left, as `ottimo doctor --repair` does."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from ottimo.config import Params
from ottimo.ops import doctor
from ottimo.registry.tracking import connect
from tasks.retry import RETRY_TRANSIENT


@task(**RETRY_TRANSIENT)
def reconcile(root: Path, params: Params) -> list[str]:
    """Run the doctor's checks (repairing when reliability.reconcile_on_start); one line per finding."""
    log = get_run_logger()
    client, exp = connect(root, params.mlflow)
    found = doctor.examine(client, exp, params.mlflow.registered_model, params.reliability,
                           repair=params.reliability.reconcile_on_start)
    lines = [f"{f.check} {f.subject}: {f.problem} -> {f.action}"
             f"{' (done)' if f.repaired else ' (not repaired)' if f.repaired is False else ' (report only)'}"
             for f in found]
    for line in lines:
        log.warning("reconcile: %s", line)
    if not lines:
        log.info("reconcile: registry and runs consistent")
    return lines
