"""The deployments `make up` serves: the training pipeline on its schedule, the tuning flow on demand.

Run by `ottimo.ops.servers` with PREFECT_API_URL pointing at the Prefect server and OTTIMO_TRACKING_URI at the
MLflow server, so runs started from the UI or by the schedule log to the MLflow server.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.pipeline import training_pipeline
from flows.tune import tuning
from ottimo.config import load_params


def deployments(project_dir: str, params_file: str = "params.yaml") -> list[RunnerDeployment]:
    """One deployment per flow, named and scheduled by params.yaml's `deploy:` section."""
    root = Path(project_dir).resolve()
    cfg = load_params(root / params_file).deploy
    where = {"project_dir": str(root), "params_file": params_file}
    training = training_pipeline.to_deployment(
        name=cfg.training_name, parameters=where, tags=["ottimo", "training"],
        schedule=Cron(cfg.training_cron, timezone=cfg.timezone) if cfg.training_cron else None,
        description="Validate and version the data, (tune,) train, export to ONNX, evaluate, gate and promote. "
                    "Empty overrides take params.yaml's values.")
    tune = tuning.to_deployment(name=cfg.tuning_name, parameters=where, tags=["ottimo", "tuning"],
                                description="Optuna studies per model family (tune: in params.yaml), no training.")
    return [training, tune, *production_loop(root, params_file)]


def production_loop(root: Path, params_file: str) -> list[RunnerDeployment]:
    """Batch scoring and the scheduled drift check (`score:` / `drift:`), manual promote and rollback."""
    from flows.drift import drift_check
    from flows.manage import promote, rollback
    from flows.score import batch_scoring

    params = load_params(root / params_file)
    where = {"project_dir": str(root), "params_file": params_file}
    tz = params.deploy.timezone
    return [
        batch_scoring.to_deployment(name=params.score.deployment_name, parameters=where, tags=["ottimo", "scoring"],
                                    description="Score the new batches in data/incoming with the champion."),
        drift_check.to_deployment(
            name=params.drift.deployment_name, parameters=where, tags=["ottimo", "monitoring"],
            schedule=Cron(params.drift.cron, timezone=tz) if params.drift.cron else None,
            description="Evidently drift check of the scored batches: nothing, retrain or rollback."),
        promote.to_deployment(name="manual", parameters=where, tags=["ottimo", "registry"],
                              description="Promote a version through the gate (force=true with a reason)."),
        rollback.to_deployment(name="manual", parameters=where, tags=["ottimo", "registry"],
                               description="Swap champion and previous-champion back."),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    serve(*deployments(args.project_dir, args.params))


if __name__ == "__main__":
    main()
