"""The tuning flow: one Optuna study per model family, trials n_jobs at a time on threads or Dask workers."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from ottimo.config import Params, load_params, project_params
from ottimo.models.tune import deadline
from tasks.data import DataVersion, prepare_data, validate_raw
from tasks.lineage import forget_subflow_results
from tasks.runner import task_runner
from tasks.summary import fail_open_mlflow_runs
from tasks.tune import TuneResult, close_study, open_study, run_trials, worker_shares


@flow(name="tuning", on_failure=[fail_open_mlflow_runs])
def tuning(project_dir: str = ".", params_file: str = "params.yaml", data: DataVersion | None = None,
           parent_run_id: str | None = None, params: Params | None = None) -> dict[str, TuneResult]:
    """Tune every family in train.candidates and return the configuration chosen for each. Run alone it
    validates and versions the data first; inside the training pipeline it gets them, and the pipeline's params
    with its run's overrides applied, from it.

    Args:
        project_dir: Project folder holding params.yaml, dvc.yaml and data/.
        params_file: Config file, relative to the project folder.
        data: The data version to tune on (inside the pipeline); empty: validate and version data.path first.
        parent_run_id: MLflow run to nest the studies under (inside the pipeline); empty: stand-alone runs.
        params: The pipeline's params with its overrides (inside the pipeline); empty: params_file as it is.
    """
    root = Path(project_dir).resolve()
    params = params or project_params(root, params_file)
    if data is None:
        validate_raw(root, params)
        data = prepare_data(root, params)

    until = deadline(params.tune)
    studies = [open_study(root, params, family, data, parent_run_id) for family in params.train.candidates]
    workers = [run_trials.submit(root, params, study, data, worker, n, until)
               for study, worker, n in worker_shares(studies, params.tune.n_jobs)]
    for worker in workers:
        worker.result()  # a worker's error fails the flow here
    return {study.family: close_study(root, params, study) for study in studies}


def with_runner(project_dir: str, params_file: str = "params.yaml"):
    """The tuning flow with the task runner params.yaml asks for (tune.runner: threads, or Dask)."""
    root = Path(project_dir).resolve()
    return tuning.with_options(task_runner=task_runner(root, load_params(root / params_file), "tune"))


def tune_stage(project_dir: str, params_file: str, params: Params, data: DataVersion,
               parent_run_id: str) -> dict[str, dict]:
    """The tuning flow as a stage of the training pipeline: {family: training overrides of the chosen trial}."""
    flow_ = tuning.with_options(task_runner=task_runner(Path(project_dir).resolve(), params, "tune"))
    results = flow_(project_dir, params_file, data, parent_run_id, params)
    forget_subflow_results()  # its family names are in `params` too: no task input of type flow_run
    return {family: r.overrides for family, r in results.items()}
