"""Drift check: Evidently on the scored batches against the champion's reference → nothing | retrain | rollback."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, runtime
from prefect.deployments import run_deployment

from ottimo.config import Params, project_params
from ottimo.data import batches
from ottimo.monitor import drift as policy
from ottimo.ops.faults import checkpoint
from tasks.drift import (
    CheckSummary,
    LabelsRejected,
    add_training_data,
    attach_late_labels,
    check_window,
    close_check,
    collect_window,
    retrain_state,
    rollback_champion,
    start_retrain,
)
from tasks.lineage import forget_subflow_results
from tasks.score import load_champion


class RetrainFailed(RuntimeError):
    """The drift check decided to retrain and the training pipeline did not finish."""


@flow(name="drift-check")
def drift_check(project_dir: str = ".", params_file: str = "params.yaml", accept_drifted: bool = False) -> CheckSummary:
    """Compare the batches scored since the last check with the champion's reference split and act on the
    policy under `drift:` in params.yaml. Report, summary and decision are in the MLflow monitoring experiment.

    Args:
        project_dir: Project folder holding params.yaml, dvc.yaml and data/.
        params_file: Config file, relative to the project folder.
        accept_drifted: Append labelled rows to the training data even when they fail its value checks or lie
            far outside its range (by default they are held back, with the reason, on retrain).
    """
    root = Path(project_dir).resolve()
    params = project_params(root, params_file)

    champion = load_champion(root, params)
    late = attach_late_labels(root, params, batches.schema_of(Path(champion.prepared))["labels"])
    window = collect_window(root, params)
    check = check_window(root, params, champion, window)
    outcome: dict[str, str] = {}
    if check.action == policy.RETRAIN:
        outcome = add_training_data(root, params, window, check.run_id, accept_drifted)
        outcome |= retrain(root, params_file, params, check.run_id)
    elif check.action == policy.ROLLBACK:
        outcome = {f"alias.{k}": v for k, v in rollback_champion(root, params, check).items()}
    summary = close_check(root, params, check, window, outcome)
    if outcome.get("training") == "failed":
        raise RetrainFailed(f"retrain decided ({'; '.join(check.reasons)}) but training failed: "
                            f"{outcome['message']}; the champion is unchanged")
    if late.rejected:
        raise LabelsRejected(f"drift check {summary.action} done without {len(late.rejected)} late-labels file(s), "
                             "quarantined (reason files beside them):\n" + "\n".join(f"- {r}" for r in late.rejected))
    return summary


def retrain(root: Path, params_file: str, params: Params, check_id: str) -> dict[str, str]:
    """The training pipeline as a subflow here, or through its deployment when this flow runs from one. The
    pipeline records its champion on the drift-check run when it finishes (either way); a rerun of the check after
    a crash resumes: a retrain that finished is not run again, a deployment run is started once (idempotency key)."""
    done = retrain_state(root, params, check_id)
    if done is not None:
        return done
    where = {"project_dir": str(root), "params_file": params_file, "drift_check_run": check_id}
    if runtime.deployment.id:
        run = run_deployment(f"training-pipeline/{params.deploy.training_name}", timeout=0, parameters=where,
                             idempotency_key=f"retrain-{check_id}")
        return start_retrain(root, params, check_id, str(run.id))
    from flows.pipeline import training_pipeline

    start_retrain(root, params, check_id, None)
    state = training_pipeline(**where, return_state=True)
    forget_subflow_results()  # close_check gets its outcome as values, not as inputs of type flow_run
    if not state.is_completed():
        return {"training": "failed", "message": state.message or state.name}
    checkpoint("after-retrain")  # the pipeline recorded its champion on the check run; the check is not closed
    summary = state.result()  # skipped: no labelled row came, so data, code and params were the champion's
    return {"training": "skipped" if summary.skipped else "completed", "champion": summary.champion} | (
        {"message": summary.message} if summary.skipped else {})
