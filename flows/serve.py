"""The deployments `make up` serves: the training pipeline on its schedule, tuning, scoring, the drift check on
its schedule, and the manual promote and rollback.

Run by `ottimo.ops.servers` with PREFECT_API_URL pointing at the Prefect server and OTTIMO_TRACKING_URI at the
MLflow server, so runs started from the UI or by the schedule log to the MLflow server.

Deployment names are identifiers a user types (`prefect deployment run training-pipeline/nightly`): the flow's
name says what runs, the deployment's name says which way it is run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.pipeline import training_pipeline
from flows.tune import tuning
from ottimo.config import Params, load_params

PROMOTE_NAME = "promote-version"  # deployment promote/promote-version
ROLLBACK_NAME = "rollback-champion"  # deployment rollback/rollback-champion

# flow parameter -> the params.yaml key an empty field keeps (the Custom run form names its current value)
FROM_PARAMS = {"max_epochs": "train.max_epochs", "min_accuracy": "gate.min_accuracy",
               "tune_enabled": "tune.enabled", "candidates": "train.candidates"}
# parameters the training pipeline hands its stage flows; not for the form (empty: the flow prepares its own)
INTERNAL = ("data", "parent_run_id", "params", "drift_check_run")  # drift_check_run: set by the drift check


def deployments(project_dir: str, params_file: str = "params.yaml") -> list[RunnerDeployment]:
    """One deployment per flow, named and scheduled by params.yaml's `deploy:` section."""
    root = Path(project_dir).resolve()
    params = load_params(root / params_file)
    cfg = params.deploy
    where = {"project_dir": str(root), "params_file": params_file}
    training = training_pipeline.to_deployment(
        name=cfg.training_name, parameters=where, tags=["ottimo", "training", "scheduled"],
        schedule=Cron(cfg.training_cron, timezone=cfg.timezone) if cfg.training_cron else None,
        description="Validate and version the data, (tune,) train, export to ONNX, evaluate, compress, gate and "
                    "promote; with nothing new since the champion (same data revision, code and params) nothing "
                    "is trained (force=true trains). Custom run: an empty override keeps params.yaml's value, "
                    "named under each field.")
    tune = tuning.to_deployment(
        name=cfg.tuning_name, parameters=where, tags=["ottimo", "tuning", "manual"],
        description="Optuna studies per model family (tune: in params.yaml), no training: the chosen settings "
                    "are logged to MLflow.")
    return [describe(d, params) for d in (training, tune, *production_loop(root, params_file))]


def production_loop(root: Path, params_file: str) -> list[RunnerDeployment]:
    """Batch scoring and the scheduled drift check (`score:` / `drift:`), manual promote and rollback."""
    from flows.drift import drift_check
    from flows.manage import promote, rollback
    from flows.score import batch_scoring

    params = load_params(root / params_file)
    where = {"project_dir": str(root), "params_file": params_file}
    tz = params.deploy.timezone
    return [
        batch_scoring.to_deployment(
            name=params.score.deployment_name, parameters=where, tags=["ottimo", "scoring", "manual"],
            description=f"Score the new batches in {params.score.incoming} with the champion; malformed ones "
                        f"move to {params.limits.quarantine_dir}."),
        drift_check.to_deployment(
            name=params.drift.deployment_name, parameters=where, tags=["ottimo", "monitoring", "scheduled"],
            schedule=Cron(params.drift.cron, timezone=tz) if params.drift.cron else None,
            description="Evidently drift check of the scored batches: nothing, retrain (runs training-pipeline/"
                        f"{params.deploy.training_name}) or rollback."),
        promote.to_deployment(
            name=PROMOTE_NAME, parameters=where, tags=["ottimo", "registry", "manual"],
            description="Make a registered version the champion through the gate (force=true with a reason)."),
        rollback.to_deployment(
            name=ROLLBACK_NAME, parameters=where, tags=["ottimo", "registry", "manual"],
            description="Swap champion and previous-champion back (the reason is tagged on both versions)."),
    ]


def describe(deployment: RunnerDeployment, params: Params) -> RunnerDeployment:
    """The Custom run form in concrete terms: a field whose empty value means "params.yaml's" names that value
    as read now, its type without the `null` branch (the UI words that "Property is type 'None'"), and the
    stage flows' internal parameters left out.

    Prefect builds the schema from the flow's signature and docstring (prefect.utilities.callables.
    parameter_schema), which cannot know params.yaml; a RunnerDeployment keeps it, unexposed, in
    `_parameter_openapi_schema`, sent to the API when it is served."""
    schema = deployment._parameter_openapi_schema
    for name in INTERNAL:
        schema.properties.pop(name, None)
    for name, prop in schema.properties.items():
        if "default" not in prop or prop["default"] is not None:
            continue
        branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
        if len(branches) == 1:
            prop.update(branches[0])
        del prop["default"]
        if name in FROM_PARAMS:
            key = FROM_PARAMS[name]
            value = params.model_dump(mode="json")
            for part in key.split("."):
                value = value[part]
            head = (prop.get("description") or name).split("; empty:")[0].removesuffix(f" ({key})")
            prop["description"] = f"{head}; empty: params.yaml's {key} ({json.dumps(value)})."
    used: dict = {}  # the definitions still referenced (by the fields left, or by each other)
    refs = json.dumps(schema.properties)
    while new := [k for k in schema.definitions if k not in used and f'"#/definitions/{k}"' in refs]:
        used |= {k: schema.definitions[k] for k in new}
        refs += json.dumps([schema.definitions[k] for k in new])
    schema.definitions = used
    return deployment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    serve(*deployments(args.project_dir, args.params))


if __name__ == "__main__":
    main()
