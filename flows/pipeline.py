"""The training pipeline: validate → version data → nothing new? → tune → train → export → evaluate → compress →
card → gate."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from ottimo.config import Params, project_params
from ottimo.registry.runkey import Novelty
from tasks.card import model_card
from tasks.data import DataVersion, prepare_data, push_data, validate_raw
from tasks.doctor import reconcile
from tasks.evaluate import evaluate_candidate, evaluate_champion, export_candidate
from tasks.registry import check_novelty, gate, promote_selected, register_candidate
from tasks.summary import (
    PipelineSummary,
    fail_open_mlflow_runs,
    report_to_drift_check,
    summarise,
    summarise_failure,
    summarise_skip,
)
from tasks.train import check_candidates, start_pipeline_run, train_candidate


@flow(name="training-pipeline", on_failure=[fail_open_mlflow_runs, summarise_failure])
def training_pipeline(project_dir: str = ".", params_file: str = "params.yaml", max_epochs: int | None = None,
                      min_accuracy: float | None = None, tune_enabled: bool | None = None,
                      candidates: list[str] | None = None, force: bool = False,
                      drift_check_run: str | None = None) -> PipelineSummary:
    """Train every candidate family on the DVC-versioned data and promote the best one that passes the gate.
    A run whose data revision, code and params are the champion's trains nothing and says so.

    Args:
        project_dir: Project folder holding params.yaml, dvc.yaml and data/.
        params_file: Config file, relative to the project folder.
        max_epochs: Epoch budget of each candidate (train.max_epochs); empty: as in params.yaml.
        min_accuracy: The gate's minimum test accuracy, 0 to 1 (gate.min_accuracy); empty: as in params.yaml.
        tune_enabled: Run the Optuna tuning stage first (tune.enabled); empty: as in params.yaml.
        candidates: Model families to train (train.candidates: mlp, transformer, cnn or one of families:); empty:
            as in params.yaml.
        force: Train even when the data revision, code and params are the champion's (the gate still holds the
            result to gate.min_gain).
        drift_check_run: The MLflow drift-check run whose retrain started this run; its outcome is recorded there.
    """
    root = Path(project_dir).resolve()
    params = project_params(root, params_file).overridden({
        "train": {"max_epochs": max_epochs, "candidates": candidates},
        "gate": {"min_accuracy": min_accuracy}, "tune": {"enabled": tune_enabled}})

    reconcile(root, params)  # first finish or undo what a crashed run left
    validate_raw(root, params)
    data = prepare_data(root, params)
    check_candidates(params, data)  # every family builds for these rows, before anything is trained or pushed
    push_data(root, params)
    run_id = start_pipeline_run(root, params, data)
    novelty = check_novelty(root, params, data, run_id, force)  # the run key against the champion's
    summary = (summarise_skip(root, params, data, run_id, novelty) if novelty.nothing_new
               else train_and_gate(root, params_file, params, data, run_id, novelty))
    if drift_check_run:
        report_to_drift_check(root, params, drift_check_run, summary.champion, skipped=summary.message)
    return summary


def train_and_gate(root: Path, params_file: str, params: Params, data: DataVersion, run_id: str,
                   novelty: Novelty) -> PipelineSummary:
    """Tune, train, export, evaluate and compress the candidates; register, card and gate them; promote."""
    tuned = {}
    if params.tune.enabled:  # Optuna, and the compression stack below, imported only by the runs that use them
        from flows.tune import tune_stage

        tuned = tune_stage(str(root), params_file, params, data, run_id)

    # one after another: torch's global RNG is shared by threads, and seeded runs must reproduce
    candidates = [train_candidate(root, params, family, data, run_id, tuned.get(family))
                  for family in params.train.candidates]
    exported = [export_candidate(root, params, c, data) for c in candidates]
    evaluated = [evaluate_candidate(root, params, c, e, data) for c, e in zip(candidates, exported, strict=True)]
    champion_accuracy = evaluate_champion(root, params, data)
    if params.compress.enabled:  # trained and compressed candidates compete; the chosen one goes on to the gate
        from flows.compress import compress_stage

        evaluated = [compress_stage(str(root), params_file, params, candidates, exported, data, run_id,
                                    champion_accuracy, novelty.same_data)]

    versions = [register_candidate(root, params, e, data, novelty.key) for e in evaluated]
    same = novelty.same_data  # on the champion's data revision a candidate must beat it by gate.min_gain
    cards = [model_card(root, params, e, v, champion_accuracy, same) for e, v in zip(evaluated, versions, strict=True)]
    decision = gate(root, params, run_id, evaluated, versions, champion_accuracy, cards=[c.figures for c in cards],
                    data=data, same_data=same)
    aliases = promote_selected(root, params, run_id, decision)
    return summarise(root, params, data, run_id, evaluated, versions, decision, aliases)
