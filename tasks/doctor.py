"""Reconcile at the pipeline's start: repair what a crashed or killed run left, as `ottimo doctor --repair` does;
and the doctor's Prefect part (flow runs left Running by a killed process), which `ottimo doctor` runs."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from ottimo.config import Params
from ottimo.monitor import ledger
from ottimo.ops import doctor
from ottimo.registry.tracking import connect
from tasks.retry import RETRY_TRANSIENT


@task(**RETRY_TRANSIENT)
def reconcile(root: Path, params: Params) -> list[str]:
    """Run the doctor's checks, Prefect flow runs left Running included (repairing when
    reliability.reconcile_on_start); one line per finding."""
    log = get_run_logger()
    client, exp = connect(root, params.mlflow)
    repair = params.reliability.reconcile_on_start
    found = doctor.examine(client, exp, params.mlflow.registered_model, params.reliability, repair=repair)
    # and flow runs a killed process (a Prefect worker, say) left Running: this run's own has no owner yet
    found += flow_runs(root, params, repair)
    lines = [f"{f.check} {f.subject}: {f.problem} -> {f.action}"
             f"{' (done)' if f.repaired else ' (not repaired)' if f.repaired is False else ' (report only)'}"
             for f in found]
    for line in lines:
        log.warning("reconcile: %s", line)
    if not lines:
        log.info("reconcile: registry and runs consistent")
    return lines


def flow_runs(root: Path, params: Params, repair: bool) -> list[doctor.Finding]:
    """Prefect flow runs still Running whose process is gone (the doctor decides from the owner tags of their
    MLflow pipeline and drift-check runs); with `repair` each is set Crashed, and a training run that a drift
    check's retrain started is recorded as crashed on that check run. Uses the Prefect API in the settings (or
    the ephemeral one)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Crashed

    client, exp = connect(root, params.mlflow)
    mclient, mexp = ledger.connect_monitoring(root, params)
    with get_client(sync_client=True) as api:
        found = api.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.RUNNING]))), sort=FlowRunSort.START_TIME_DESC, limit=200)
        running = [doctor.FlowRun(str(r.id), r.name, (r.parameters or {}).get("drift_check_run")) for r in found]
        owners = doctor.flow_run_owners(client, [exp, mexp], [r.id for r in running])

        def crash(run: doctor.FlowRun, message: str) -> None:
            api.set_flow_run_state(run.id, Crashed(message=message), force=True)
            if run.drift_check_run:
                ledger.record_retrain(mclient, run.drift_check_run, "crashed", message=message)

        return doctor.stale_flow_runs(running, owners, crash if repair else None)
