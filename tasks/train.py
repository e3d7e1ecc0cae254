"""Training tasks: open the pipeline's MLflow run, train one candidate per model family."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch
from prefect import get_run_logger, runtime, task

from ottimo import vocab
from ottimo.config import Params
from ottimo.data import labels
from ottimo.data.tables import load_splits
from ottimo.models.family import FamilyError, Recipe, build, count_parameters, recipe
from ottimo.models.train import fit
from ottimo.ops.doctor import owner
from ottimo.ops.faults import checkpoint
from ottimo.registry import report
from ottimo.registry.tracking import connect, flatten, stamped, work_dir
from ottimo.spec import InputSpec
from tasks.data import DataVersion


def flow_run_url() -> str | None:
    """The Prefect UI page of the current flow run when a Prefect server is used (PREFECT_UI_URL, derived from
    PREFECT_API_URL); None on the ephemeral API, which has no UI to link to."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if not settings.api.url or not settings.ui_url:
        return None
    return f"{settings.ui_url.rstrip('/')}/runs/flow-run/{runtime.flow_run.id}"


RECIPE_FILE = "recipe.json"  # a trained candidate's Recipe, logged to its run


@dataclass(frozen=True)
class Candidate:
    family: str
    run_id: str  # the candidate's MLflow run, nested under the pipeline run
    checkpoint: str  # state_dict file, loaded back with weights_only=True
    recipe: Recipe  # what builds and trains it (the family's settings, tuned values laid over them)
    spec: InputSpec  # one input row
    n_classes: int
    parameters: int
    best_epoch: int
    val_accuracy: float
    tuned: bool = False  # the recipe holds a tuning trial's values


@task
def start_pipeline_run(root: Path, params: Params, data: DataVersion) -> str:
    """Open the parent MLflow run: params, data revision, dataset input, Prefect flow-run id (and its UI page)."""
    client, exp = connect(root, params.mlflow)
    url = flow_run_url()
    flow_run_id = str(runtime.flow_run.id)
    run = client.create_run(exp, run_name=report.running_name(report.dataset_name(params), data.revision), tags={
        vocab.FLOW_RUN: flow_run_id, vocab.ROOT_FLOW_RUN: flow_run_id, vocab.DATA_REVISION: data.revision,
        vocab.CLASSES: labels.tag_of(data.prepared),  # the classes this data revision fixed (output i = class i)
        vocab.KIND: vocab.PIPELINE, vocab.OWNER: owner(),  # `ottimo doctor` fails the run if this process dies RUNNING
        vocab.NOTE: "Running." + (f" Prefect: [flow run]({url})." if url else ""),
        **({vocab.FLOW_RUN_URL: url} if url else {})})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in flatten(
        params.model_dump()).items()])
    train = pd.read_parquet(Path(data.prepared) / "train.parquet")
    with warnings.catch_warnings():  # MLflow's hints on integer columns and local sources: not the user's business
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")
        ds = mlflow.data.from_pandas(train, source=data.prepared, targets=params.data.target, name="train",
                                     digest=data.revision[:12])
        entity = ds._to_mlflow_entity()  # inside: the dataset infers its schema (and hints) only here
    client.log_inputs(run.info.run_id, [mlflow.entities.DatasetInput(entity)])
    get_run_logger().info("MLflow run %s (experiment %s)", run.info.run_id, params.mlflow.experiment)
    return run.info.run_id


@task(task_run_name="train_candidate[{family}]")
def train_candidate(root: Path, params: Params, family: str, data: DataVersion, parent_run_id: str,
                    overrides: dict | None = None) -> Candidate:
    """Train one model family with early stopping; per-epoch metrics and the best checkpoint go to MLflow.
    `overrides` (the tuning stage's choice) patch params.yaml's train settings."""
    log = get_run_logger()
    client, exp = connect(root, params.mlflow)
    r = recipe(params.families, params.train, family, overrides)
    run = client.create_run(exp, run_name=f"{family} trained{' (tuned)' if overrides else ''}", tags={
        **report.inherited(client, parent_run_id), vocab.PARENT: parent_run_id,
        vocab.FLOW_RUN: str(runtime.flow_run.id), vocab.DATA_REVISION: data.revision, vocab.KIND: vocab.CANDIDATE,
        vocab.FAMILY_RUN: family, vocab.CANDIDATE_NAME: family, vocab.TECHNIQUE: "trained",
        "tuned": str(bool(overrides)).lower()})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in flatten(
        {"family": family, "builder": r.builder, "hparams": r.hparams, "optimizer": r.optimizer, "lr": r.lr,
         "weight_decay": r.weight_decay, "batch_size": r.batch_size, "max_epochs": params.train.max_epochs,
         "patience": params.train.patience, "seed": params.project.seed}).items()])
    client.log_text(run_id, r.to_json(), RECIPE_FILE)  # `ottimo compress --run-id` rebuilds the model from it

    splits = load_splits(Path(data.prepared))
    pending: list = []  # mlflow Metric records

    def on_epoch(row: dict[str, float]) -> None:
        step = int(row["epoch"])
        pending.extend(stamped({k: v for k, v in row.items() if k != "epoch"}, step))
        if step % params.train.log_every == 0:
            log.info("%s epoch %d: train_loss %.4f val_loss %.4f val_acc %.4f", family, step,
                     row["train_loss"], row["val_loss"], row["val_accuracy"])
            client.log_batch(run_id, metrics=pending)
            pending.clear()

    result = fit(r, splits, params.train, params.project.seed, on_epoch)
    if pending:
        client.log_batch(run_id, metrics=pending)
    ckpt = work_dir(root, run_id) / "checkpoint.pt"
    torch.save(result.model.state_dict(), ckpt)
    client.log_artifact(run_id, str(ckpt))
    n_params = count_parameters(result.model)
    client.log_batch(run_id, metrics=stamped({"best_val_accuracy": result.best_val_accuracy,
                                              "best_epoch": result.best_epoch, "parameters": n_params}))
    log.info("%s: best epoch %d of %d, val_acc %.4f, %d parameters", family, result.best_epoch,
             result.epochs_run, result.best_val_accuracy, n_params)
    checkpoint("after-training")
    return Candidate(family, run_id, str(ckpt), r, splits.input, len(splits.labels), n_params,
                     result.best_epoch, result.best_val_accuracy, bool(overrides))


@task
def check_candidates(params: Params, data: DataVersion) -> list[str]:
    """Build every candidate family once for the data's rows before any training: a builder that cannot be
    imported or cannot take these rows fails the run at once, naming the family and what to change."""
    splits = load_splits(Path(data.prepared))
    for family in params.train.candidates:
        build(recipe(params.families, params.train, family), splits.input, len(splits.labels))
    distill = params.compress.distill
    if params.compress.enabled and distill.enabled:
        try:
            build(recipe(params.families, params.train, distill.student, {"hparams": distill.hparams}), splits.input,
                  len(splits.labels))
        except FamilyError as err:
            raise FamilyError(f"compress.distill.student: {err}. Set compress.distill.student (and its hparams) to "
                              "a family that takes these rows, or disable distillation") from None
    get_run_logger().info("families %s build for %s rows, %d classes", params.train.candidates,
                          splits.input.describe(), len(splits.labels))
    return list(params.train.candidates)
