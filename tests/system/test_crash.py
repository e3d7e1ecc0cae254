"""Crash and resume (slow): `ottimo run` in its own process dies hard at a stage boundary; the next run reconciles
and finishes the job. The points are ottimo.ops.faults.POINTS; later stages add theirs there."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from flows.pipeline import training_pipeline
from ottimo import vocab
from ottimo.config import deep_merge, load_params
from ottimo.data import versioning
from ottimo.ops import faults
from ottimo.ops.doctor import examine
from ottimo.registry import promotion, versions
from ottimo.registry.tracking import connect
from tests.conftest import REPO, write_project

# the crashed run and the rerun train again on the champion's data (forced where nothing else is new): the gate
# may not refuse them for not beating it (gate.min_gain), nor a tuned model for being a little less accurate
TINY_RUN = {"train": {"candidates": ["mlp"], "max_epochs": 3}, "gate": {"min_gain": -100.0}}
# the points inside tuning and compression run those stages (tiny)
STAGE_ON = {"gate": {"min_accuracy": 0.3}}
OVERRIDES = {
    "mid-tuning": {"tune": {"enabled": True, "n_trials": 3, "n_jobs": 1, "sampler": "random", "pruner": "none"},
                   **STAGE_ON},
    "mid-compression": {"train": {"candidates": ["transformer"], "max_epochs": 8},
                        "compress": {"enabled": True, "bases": ["student"], "n_jobs": 1,
                                     "prune": {"unstructured": [], "structured": [0.5], "finetune_epochs": 1},
                                     "quantize": {"options": ["int8-dyn"], "after_structured": False},
                                     "distill": {"epochs": 3, "hparams": {"hidden": [32]}},
                                     "select": {"max_drop_vs_teacher": 100.0, "min_accuracy": 0.3}},
                        **STAGE_ON},
}
CRASH_AT = {"mid-tuning": "mid-tuning@2"}  # the second trial dies after training: trial 0 is kept, 1 interrupted


@pytest.mark.slow
@pytest.mark.parametrize("point", faults.POINTS)
def test_a_hard_crash_then_a_rerun_finishes_the_job(point, tmp_path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    project = write_project(tmp_path / "project", deep_merge(TINY_RUN, OVERRIDES.get(point, {})))
    params = load_params(project / "params.yaml")
    name = params.mlflow.registered_model
    first = training_pipeline(project_dir=str(project), tune_enabled=False, return_state=True)
    assert first.is_completed(), first.message  # a champion to replace (untuned: the study starts with the crash)

    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_API_URL=PREFECT_API_URL.value(),
               OTTIMO_CRASH_AT=CRASH_AT.get(point, point), OMP_NUM_THREADS="1")
    crash = subprocess.run([sys.executable, "-m", "ottimo.cli", "run", "-C", str(project), "--force"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert crash.returncode == faults.EXIT_CODE, crash.stdout[-2000:] + crash.stderr[-3000:]
    client, exp = connect(project, params.mlflow)
    left_running = client.search_runs([exp], "attributes.status = 'RUNNING'")
    assert bool(left_running) is (point != "after-prepare")  # the pipeline's MLflow run opens after prepare

    rerun = training_pipeline(project_dir=str(project), force=True, return_state=True)
    assert rerun.is_completed(), rerun.message
    summary = rerun.result()

    runs = client.search_runs([exp])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert all("process died" in r.data.tags["failure"] for r in runs if r.info.status == "FAILED")
    found = client.search_model_versions(f"name = '{name}'")
    assert max(Counter(v.run_id for v in found).values()) == 1  # no run registered twice
    verdicts = Counter(vocab.tag(v.tags, vocab.GATE_VERDICT) for v in found)
    assert set(verdicts) <= {"passed", "failed", vocab.ABANDONED}
    assert verdicts[vocab.ABANDONED] == (1 if point == "after-registering" else 0)
    aliases = versions.aliases(client, name)
    assert aliases["champion"] == summary.champion
    # the promotion the crash cut in two was finished by the rerun's reconcile, so its version came in between
    assert aliases["previous-champion"] == ("2" if point == "between-alias-moves" else "1")
    assert promotion.journal(client, name) is None
    assert examine(client, exp, name, params.reliability) == []
    assert versioning.status_cloud(project) == {}  # `dvc status -c`: cache and remote agree
    if point == "mid-tuning":
        _study_resumed(project, params, summary)


def _study_resumed(project, params, summary) -> None:
    """The trial finished before the crash is kept and counted, the one it left RUNNING is failed as interrupted,
    and the rerun ran only the trials still missing."""
    from optuna.trial import TrialState

    from ottimo.models import tune

    url = tune.storage_url(project, params.tune)
    study = tune.open_study(url, tune.study_name(params.tune, "mlp", summary.data_revision), params.tune, "mlp", 0)
    states = [t.state for t in sorted(study.trials, key=lambda t: t.number)]
    assert states[:2] == [TrialState.COMPLETE, TrialState.FAIL]  # trial 0 before the crash, trial 1 cut by it
    assert study.trials[1].user_attrs["fail_reason"] == tune.INTERRUPTED
    assert len(states) == params.tune.n_trials + 1  # 1 kept + 1 interrupted + only the 2 left, not 3 again
    assert tune.remaining(study, params.tune.n_trials) == 0
