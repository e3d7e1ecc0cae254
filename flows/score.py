"""Batch scoring: the champion (sha256-verified ONNX) scores every new batch in data/incoming."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from ottimo.config import project_params
from tasks.score import Scored, find_batches, load_champion, report_scoring, score_batch


@flow(name="batch-scoring")
def batch_scoring(project_dir: str = ".", params_file: str = "params.yaml") -> list[Scored]:
    """Score each unscored batch in `score.incoming` with the champion; predictions go next to the batch.
    A malformed batch is quarantined and the run fails naming it; the other batches are still scored.

    Args:
        project_dir: Project folder holding params.yaml and data/.
        params_file: Config file, relative to the project folder.
    """
    root = Path(project_dir).resolve()
    params = project_params(root, params_file)

    champion = load_champion(root, params)
    results = [score_batch(root, params, champion, batch) for batch in find_batches(root, params)]
    return report_scoring(params, champion, results)
