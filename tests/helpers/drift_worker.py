"""`python -m tests.helpers.drift_worker PROJECT`: `ottimo drift-check -C PROJECT` with a stand-in training pipeline
(`fake_training`), so crash tests of the drift check's retrain need no real training run."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from ottimo.config import project_params

TRAINED: list[str] = []  # drift-check runs this process retrained for


@dataclass(frozen=True)
class Trained:
    champion: str
    skipped: bool = False  # as the real pipeline's summary says
    message: str = ""


@flow(name="training-pipeline")
def fake_training(project_dir: str = ".", params_file: str = "params.yaml",
                  drift_check_run: str | None = None) -> Trained:
    """What the real pipeline does for the drift check that started it, and no training: report its champion."""
    from tasks.summary import report_to_drift_check

    root = Path(project_dir)
    TRAINED.append(drift_check_run or "")
    if drift_check_run:
        report_to_drift_check(root, project_params(root, params_file), drift_check_run, "1")
    return Trained("1")


def main(project: str) -> None:
    import flows.pipeline
    from ottimo.cli.main import app

    flows.pipeline.training_pipeline = fake_training
    app(["drift-check", "-C", project], standalone_mode=True)


if __name__ == "__main__":
    main(sys.argv[1])
