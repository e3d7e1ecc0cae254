"""One promotion attempt in its own process, for tests:
`python tests/helpers/promote_worker.py PROJECT VERSION EXPECTED DIR`.

A Prefect flow (on the API named by PREFECT_API_URL) opens a pipeline-like MLflow run owned by this process, writes
DIR/ready-VERSION and waits for DIR/go, so that every attempt has decided on the same champion before they race,
then runs the pipeline's promote task. Exit code 0: promoted; 1: refused; 77: crashed on purpose (OTTIMO_CRASH_AT).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from prefect import flow

from ottimo import vocab
from ottimo.config import load_params
from ottimo.ops.doctor import owner
from ottimo.registry.tracking import connect
from tasks.registry import GateDecision, promote_selected


@flow(name="promotion-attempt")
def attempt(project_dir: str, version: str, expected: str | None, barrier: str) -> dict[str, str]:
    root = Path(project_dir)
    params = load_params(root / "params.yaml")
    client, exp = connect(root, params.mlflow)
    run = client.create_run(exp, run_name="pipeline", tags={"ottimo.kind": "pipeline", vocab.OWNER: owner(),
                                                            "attempt.version": version})
    (Path(barrier) / f"ready-{version}").touch()
    while not (Path(barrier) / "go").exists():
        time.sleep(0.01)
    return promote_selected(root, params, run.info.run_id, GateDecision("mlp", version, True, [], {}, expected))


if __name__ == "__main__":
    project, version, expected, barrier = sys.argv[1:5]
    state = attempt(project, version, None if expected == "none" else expected, barrier, return_state=True)
    sys.exit(0 if state.is_completed() else 1)
