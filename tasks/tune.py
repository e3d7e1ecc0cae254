"""Tuning tasks: open (or resume) a family's Optuna study, run a worker's share of its trials, close it.

Tasks pass the study by name and storage URL (StudyRef), never a live Study: a worker may be a thread of
this process or a Dask worker process (tune.runner), and each opens the shared RDB storage itself. Each trial's
MLflow run is tagged with the worker that ran it (ottimo.worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

from mlflow.entities import Param
from prefect import get_run_logger, runtime, task

from ottimo import vocab
from ottimo.config import Params
from ottimo.data.tables import load_splits
from ottimo.models import tune
from ottimo.models.family import recipe, to_overrides
from ottimo.ops.dask_cluster import current_worker
from ottimo.ops.doctor import owner
from ottimo.registry import report
from ottimo.registry.tracking import connect, flatten, stamped, work_dir
from tasks.data import DataVersion


@dataclass(frozen=True)
class StudyRef:
    family: str
    name: str  # Optuna study name
    storage: str  # resolved storage URL
    seed: int
    remaining: int  # trials still to run to reach tune.n_trials
    interrupted: list[int]  # trials a stopped run had left RUNNING, now FAIL
    mlflow_run_id: str  # the study's MLflow run (nested under the pipeline run inside the pipeline)
    flow_run_id: str


@dataclass(frozen=True)
class TuneResult:
    family: str
    study: str
    trial: int | None  # the chosen trial; None when the wall budget ran out before any trial
    overrides: dict  # the chosen trial's {"hparams", "train"} ({} when none): laid over the family's recipe
    values: list[float]  # its val accuracy (and ONNX p95 ms when multi-objective)
    complete: int
    pruned: int
    failed: int
    epochs: int  # epochs trained over the whole study
    mlflow_run_id: str
    pareto: list[dict] = field(default_factory=list)  # multi-objective: {trial, val_accuracy, p95_ms}


def worker_shares(studies: list[StudyRef], n_jobs: int) -> list[tuple[StudyRef, int, int]]:
    """(study, worker index, trials) for every worker, families interleaved so that each makes progress
    within the wall budget."""
    per_study = [[(s, w, n) for w, n in enumerate(tune.shares(s.remaining, n_jobs))] for s in studies]
    return [job for jobs in zip_longest(*per_study) for job in jobs if job]


@task(task_run_name="open_study[{family}]")
def open_study(root: Path, params: Params, family: str, data: DataVersion, parent_run_id: str | None) -> StudyRef:
    """Create the family's study or resume it (trials a crash left RUNNING are marked failed); open its MLflow run."""
    log = get_run_logger()
    cfg = params.tune
    url = tune.storage_url(root, cfg)
    name = tune.study_name(cfg, family, data.revision)
    seed = params.project.seed if cfg.seed is None else cfg.seed
    study = tune.open_study(url, name, cfg, params.families[family], seed)
    interrupted = tune.fail_interrupted(url, name)
    left = tune.remaining(study, cfg.n_trials)
    flow_run_id = str(runtime.flow_run.id)
    client, exp = connect(root, params.mlflow)
    tags = {**report.inherited(client, parent_run_id), vocab.FLOW_RUN: flow_run_id, vocab.KIND: vocab.STUDY,
            "optuna.study": name, vocab.FAMILY_RUN: family,
            vocab.DATA_REVISION: data.revision, "optuna.resumed_trials": str(len(study.trials) - len(interrupted)),
            "optuna.interrupted": ",".join(map(str, interrupted))}
    if parent_run_id:
        tags[vocab.PARENT] = parent_run_id
    else:
        tags[vocab.OWNER] = owner()  # stand-alone: `ottimo doctor` fails the run if this process dies with it RUNNING
    run = client.create_run(exp, run_name=f"tune-{family}", tags=tags)
    for t in study.get_trials(deepcopy=False):  # MLflow runs of interrupted trials, and of their study, fail too
        if t.number in interrupted and t.user_attrs.get("mlflow_run_id"):
            trial_run = client.get_run(t.user_attrs["mlflow_run_id"])
            for run_id in (trial_run.info.run_id, trial_run.data.tags.get(vocab.PARENT)):
                if run_id and client.get_run(run_id).info.status == "RUNNING":
                    client.set_tag(run_id, vocab.FAILURE, tune.INTERRUPTED)
                    client.set_terminated(run_id, "FAILED")
            client.set_tag(trial_run.info.run_id, "trial.state", "failed")
    fam = params.families[family]
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(
        {**cfg.model_dump(exclude={"enabled"}), "seed": seed, "trial_epochs": fam.trial_epochs,
         "space": fam.model_dump(mode="json")["space"]}).items()])
    log.info("study %s (%s): %d trial(s) already there, %d interrupted marked failed, %d to run",
             name, url.split("://")[0], len(study.trials), len(interrupted), left)
    return StudyRef(family, name, url, seed, left, interrupted, run.info.run_id, flow_run_id)


@task(task_run_name="run_trials[{ref.family} worker {worker}]")
def run_trials(root: Path, params: Params, ref: StudyRef, data: DataVersion, worker: int, n_trials: int,
               until: float | None) -> list[int]:
    """One worker's share: up to n_trials trials, none starting after `until`, each one a nested MLflow run."""
    cfg = params.tune
    fam = params.families[ref.family]
    study = tune.open_study(ref.storage, ref.name, cfg, fam, ref.seed, worker)
    client, exp = connect(root, params.mlflow)
    runs = tune.TrialRuns(client, exp, ref.mlflow_run_id, {  # the study run's filterable tags, and its flow run
        **report.inherited(client, ref.mlflow_run_id), vocab.FLOW_RUN: ref.flow_run_id, "optuna.study": ref.name,
        vocab.FAMILY_RUN: ref.family, vocab.DATA_REVISION: data.revision, vocab.WORKER: current_worker()})
    objective = tune.objective(recipe(params.families, params.train, ref.family), fam, load_splits(
        Path(data.prepared)), params.train, cfg, params.evaluate, ref.seed, runs)
    log = get_run_logger()

    def progress(t) -> None:
        log.info("%s trial %d %s: %s", ref.name, t.number, t.state.name.lower(),
                 ", ".join(f"{v:.4f}" for v in t.values or []) or f"at epoch {t.last_step}")

    with tune.torch_threads(cfg.threads_per_trial):
        # a stable share id: a retried or rescheduled worker runs only what its share still lacks
        numbers = tune.run_trials(study, objective, n_trials, until, progress, share=f"{ref.flow_run_id}/{worker}")
    log.info("%s worker %d ran trial(s) %s", ref.name, worker, numbers or "none (budget spent)")
    return numbers


@task(task_run_name="close_study[{ref.family}]")
def close_study(root: Path, params: Params, ref: StudyRef) -> TuneResult:
    """Choose the configuration to train; log best params and value, counts and Optuna's plots to the study run.

    Raises TuningFailed (the flow run fails) when trials ran and none completed.
    """
    log = get_run_logger()
    cfg = params.tune
    client, _ = connect(root, params.mlflow)
    fam = params.families[ref.family]
    study = tune.open_study(ref.storage, ref.name, cfg, fam, ref.seed)
    n = tune.counts(study)
    metrics = stamped({f"trials_{k}" if k != "epochs" else "epochs_total": v for k, v in n.items()})
    try:
        best = tune.choose(study, cfg, ref.family)
    except tune.TuningFailed as err:
        client.log_batch(ref.mlflow_run_id, metrics=metrics)
        client.set_tag(ref.mlflow_run_id, vocab.FAILURE, vocab.clip(str(err)))
        client.set_terminated(ref.mlflow_run_id, "FAILED")
        raise
    pareto = [{"trial": t.number, "val_accuracy": t.values[0], "p95_ms": t.values[1]}
              for t in (tune.pareto_front(study) if cfg.multi_objective and best else [])]
    if best is None:
        log.warning("%s: the wall budget ran out before any trial; %s trains with params.yaml", ref.name, ref.family)
        client.set_tag(ref.mlflow_run_id, "optuna.chosen_trial", "none: budget spent before any trial")
    else:
        metrics += stamped({f"best_{k}": v for k, v in zip(tune.OBJECTIVES, best.values, strict=False)})
        client.log_batch(ref.mlflow_run_id, params=[Param(f"best.{k}", str(v)) for k, v in best.params.items()])
        client.set_tag(ref.mlflow_run_id, "optuna.chosen_trial", str(best.number))
        log.info("%s: trial %d chosen, %s, params %s; %d complete, %d pruned, %d failed, %d epochs", ref.name,
                 best.number, dict(zip(tune.OBJECTIVES, best.values, strict=False)), best.params, n["complete"],
                 n["pruned"], n["failed"], n["epochs"])
    client.log_batch(ref.mlflow_run_id, metrics=metrics)
    out = work_dir(root, ref.mlflow_run_id)
    for path in tune.save_plots(study, out / "plots"):
        client.log_artifact(ref.mlflow_run_id, str(path), "plots")
    if pareto:
        client.log_dict(ref.mlflow_run_id, {"chosen": best.number, "front": pareto}, "pareto_front.json")
    client.set_terminated(ref.mlflow_run_id, "FINISHED")
    return TuneResult(ref.family, ref.name, best.number if best else None,
                      to_overrides(tune.decode(fam, best.params)) if best else {}, list(best.values) if best else [],
                      n["complete"], n["pruned"], n["failed"], n["epochs"], ref.mlflow_run_id, pareto)
