"""The deployments `make up` serves: the training pipeline on its schedule, tuning, scoring, the drift check on
its schedule, and the manual promote and rollback.

Run by `ottimo.ops.servers` with PREFECT_API_URL pointing at the Prefect server and OTTIMO_TRACKING_URI at the
MLflow server, so runs started from the UI or by the schedule log to the MLflow server. Embedded (`make up`), this
process serves them (`prefect.serve`) and runs their flow runs; with `--pool` (`make up STACK=postgres`) it
registers them to a process work pool and exits: the pool's workers run them, each flow loaded from this code
folder by its entrypoint (`flow.from_source`).

Deployment names are identifiers a user types (`prefect deployment run training-pipeline/nightly`): the flow's
name says what runs, the deployment's name says which way it is run.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from prefect import Flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.pipeline import training_pipeline
from flows.tune import tuning
from ottimo.config import Params, load_params

CODE = Path(__file__).resolve().parents[1]  # the folder flows/ is in: a worker loads each flow from here
PROMOTE_NAME = "promote-version"  # deployment promote/promote-version
ROLLBACK_NAME = "rollback-champion"  # deployment rollback/rollback-champion

# flow parameter -> the params.yaml key an empty field keeps (the Custom run form names its current value)
FROM_PARAMS = {"max_epochs": "train.max_epochs", "min_accuracy": "gate.min_accuracy",
               "tune_enabled": "tune.enabled", "candidates": "train.candidates"}
# parameters the training pipeline hands its stage flows; not for the form (empty: the flow prepares its own)
INTERNAL = ("data", "parent_run_id", "params", "drift_check_run")  # drift_check_run: set by the drift check


def from_source(flow_: Flow, source: str | None = None) -> Flow:
    """The flow as a work pool's worker loads it: from `source` (deploy.team.source: a git URL; None: CODE), by
    its entrypoint (flows/<file>.py:<function>)."""
    path = Path(inspect.getsourcefile(flow_.fn)).resolve().relative_to(CODE)
    return Flow.from_source(source=source or str(CODE), entrypoint=f"{path.as_posix()}:{flow_.fn.__name__}")


def deployments(project_dir: str, params_file: str = "params.yaml", pooled: bool = False) -> list[RunnerDeployment]:
    """One deployment per flow, named and scheduled by params.yaml's `deploy:` section; `pooled`: each flow
    loaded from source, for a work pool."""
    root = Path(project_dir).resolve()
    params = load_params(root / params_file)
    cfg = params.deploy
    where = {"project_dir": str(root), "params_file": params_file}
    load = (lambda f: from_source(f, cfg.team.source)) if pooled else (lambda f: f)
    training = load(training_pipeline).to_deployment(
        name=cfg.training_name, parameters=where, tags=["ottimo", "training", "scheduled"],
        schedule=Cron(cfg.training_cron, timezone=cfg.timezone) if cfg.training_cron else None,
        description="Validate and version the data, (tune,) train, export to ONNX, evaluate, compress, gate and "
                    "promote; with nothing new since the champion (same data revision, code and params) nothing "
                    "is trained (force=true trains). Custom run: an empty override keeps params.yaml's value, "
                    "named under each field.")
    tune = load(tuning).to_deployment(
        name=cfg.tuning_name, parameters=where, tags=["ottimo", "tuning", "manual"],
        description="Optuna studies per model family (tune: in params.yaml), no training: the chosen settings "
                    "are logged to MLflow.")
    return [describe(d, params) for d in (training, tune, *production_loop(root, params_file, load))]


def production_loop(root: Path, params_file: str, load=lambda f: f) -> list[RunnerDeployment]:
    """Batch scoring and the scheduled drift check (`score:` / `drift:`), manual promote and rollback."""
    from flows.drift import drift_check
    from flows.manage import promote, rollback
    from flows.score import batch_scoring

    params = load_params(root / params_file)
    where = {"project_dir": str(root), "params_file": params_file}
    tz = params.deploy.timezone
    return [
        load(batch_scoring).to_deployment(
            name=params.score.deployment_name, parameters=where, tags=["ottimo", "scoring", "manual"],
            description=f"Score the new batches in {params.score.incoming} with the champion; malformed ones "
                        f"move to {params.limits.quarantine_dir}."),
        load(drift_check).to_deployment(
            name=params.drift.deployment_name, parameters=where, tags=["ottimo", "monitoring", "scheduled"],
            schedule=Cron(params.drift.cron, timezone=tz) if params.drift.cron else None,
            description="Evidently drift check of the scored batches: nothing, retrain (runs training-pipeline/"
                        f"{params.deploy.training_name}) or rollback."),
        load(promote).to_deployment(
            name=PROMOTE_NAME, parameters=where, tags=["ottimo", "registry", "manual"],
            description="Make a registered version the champion through the gate (force=true with a reason)."),
        load(rollback).to_deployment(
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


def register(project_dir: str, params_file: str, pool: str, concurrency: int) -> list[str]:
    """Create the process work pool `pool` (or set its concurrency limit) and register every deployment to it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=concurrency))
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", concurrency_limit=concurrency))
    # RunnerDeployment.apply, not prefect.deploy: deploy() also lists the pool's workers with a null limit, which
    # Prefect 3.8.8's server refuses (422 "Input should be a valid integer")
    return [str(d.apply(work_pool_name=pool)) for d in deployments(project_dir, params_file, pooled=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pool", help="register the deployments to this process work pool instead of serving them")
    parser.add_argument("--concurrency", type=int, default=1, help="the pool's concurrency limit (with --pool)")
    args = parser.parse_args()
    if args.pool:
        ids = register(args.project_dir, args.params, args.pool, args.concurrency)
        print(f"{len(ids)} deployments registered to work pool {args.pool} (concurrency {args.concurrency})")
        return
    serve(*deployments(args.project_dir, args.params))


if __name__ == "__main__":
    main()
