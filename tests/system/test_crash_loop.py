"""Crash and resume in the production loop (slow): `ottimo score` dies after its first batch of three, `ottimo
drift-check` dies after it has decided and before it acts; the rerun finishes the job, scoring every batch exactly
once and taking the one decision once. Points: ottimo.ops.faults.LOOP_POINTS."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pandas as pd
import pytest

from flows.drift import drift_check
from flows.score import batch_scoring
from ottimo import vocab
from ottimo.data.tables import builtin_frame
from ottimo.monitor import ledger
from ottimo.ops import faults
from ottimo.registry import versions
from tests.conftest import REPO
from tests.helpers.loop_helpers import loop_project

SMALL = {"drift": {"min_rows": 60, "max_rows": 200}}


def _crash(point: str, command: str, root, module: str = "ottimo.cli") -> None:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_API_URL=PREFECT_API_URL.value(), OTTIMO_CRASH_AT=point,
               OMP_NUM_THREADS="1")
    args = [command, "-C", str(root)] if module == "ottimo.cli" else [str(root)]
    out = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == faults.EXIT_CODE, out.stdout[-2000:] + out.stderr[-3000:]


def _batches(root, incoming, n: int) -> list[str]:
    incoming.mkdir(parents=True, exist_ok=True)
    df = builtin_frame("digits").drop(columns=["target"])
    names = []
    for i in range(n):
        name = f"b{i}.parquet"
        df.iloc[i * 40:(i + 1) * 40].to_parquet(incoming / name, index=False)
        names.append(name)
    return names


def _score_runs(client, exp):
    return client.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.SCORE}'")


@pytest.mark.slow
def test_a_crash_mid_scoring_then_a_rerun_scores_every_batch_once(tmp_path, prefect_harness):
    root, params, _, _, _ = loop_project(tmp_path / "project", SMALL)
    incoming = root / params.score.incoming
    names = _batches(root, incoming, 3)

    _crash("mid-scoring", "score", root)
    done = sorted(p.name for p in incoming.glob("*.predictions.parquet"))
    assert done == ["b0.predictions.parquet"]  # the first batch, and only it, was scored before the crash

    assert batch_scoring(project_dir=str(root), return_state=True).is_completed()
    client, exp = ledger.connect_monitoring(root, params)
    runs = _score_runs(client, exp)
    assert Counter(r.data.tags["batch"] for r in runs) == Counter(names)  # every batch once, none twice
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["batch"]: r.data.metrics["rows"] for r in runs} == dict.fromkeys(names, 40)
    assert not list(incoming.glob("*.tmp"))
    # nothing left to score: a third run changes nothing
    assert batch_scoring(project_dir=str(root), return_state=True).is_completed()
    assert len(_score_runs(client, exp)) == 3


@pytest.mark.slow
def test_a_crash_mid_drift_check_then_a_rerun_takes_the_decision_once(tmp_path, prefect_harness):
    root, params, client, train_exp, _ = loop_project(tmp_path / "project", SMALL, versions=2)
    name = params.mlflow.registered_model
    _batches(root, root / params.score.incoming, 2)
    assert batch_scoring(project_dir=str(root), return_state=True).is_completed()
    aliases = versions.aliases(client, name)

    _crash("mid-drift-check", "drift-check", root)
    mclient, exp = ledger.connect_monitoring(root, params)
    [left] = mclient.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.CHECK}'")
    assert left.data.tags[vocab.CLOSED] == "false" and len(ledger.unchecked(mclient, exp)) == 2

    state = drift_check(project_dir=str(root), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    checks = mclient.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.CHECK}'")
    assert [c.info.run_id for c in checks] == [left.info.run_id] == [summary.run_id]  # one decision, taken once
    assert summary.action == left.data.tags["decision"]
    assert mclient.get_run(left.info.run_id).data.tags[vocab.CLOSED] == "true"
    assert ledger.unchecked(mclient, exp) == []
    assert {r.data.tags[vocab.CHECKED] for r in _score_runs(mclient, exp)} == {left.info.run_id}
    if summary.action == "nothing":
        assert versions.aliases(client, name) == aliases
    elif summary.action == "retrain":  # the label-free estimate may call for one on these linear models: one retrain
        pipelines = client.search_runs([train_exp], f"tags.`{vocab.KIND}` = '{vocab.PIPELINE}'")
        assert len(pipelines) == 1, [r.info.run_name for r in pipelines]
    assert not mclient.search_runs([exp], "attributes.status = 'RUNNING'")


RETRAIN = {"drift": {"min_rows": 60, "max_rows": 200, "rollback_margin": 100.0}}


def _labelled(root, params, n: int = 2) -> None:
    """`n` labelled batches of 40 rows (the prepared test split, target included, every pixel that reaches 8 or
    more +2: data drift within the hold-back margin), scored."""
    incoming = root / params.score.incoming
    incoming.mkdir(parents=True, exist_ok=True)
    test = pd.read_parquet(root / "data" / "prepared" / "test.parquet")
    features = [c for c in test.columns if c != params.data.target and test[c].max() >= 8]
    test[features] = test[features] + 2.0
    for i in range(n):
        test.iloc[i * 40:(i + 1) * 40].to_parquet(incoming / f"l{i}.parquet", index=False)
    assert batch_scoring(project_dir=str(root), return_state=True).is_completed()


@pytest.mark.slow
def test_a_crash_after_appending_rows_then_a_rerun_appends_them_once(tmp_path, prefect_harness, monkeypatch):
    """Killed after the append, before DVC versioned it: the rerun resumes the check from its acting marker (the
    rows are in, once); `ottimo doctor` finds the killed drift-check flow run still Running and sets it Crashed."""
    from prefect.client.orchestration import get_client

    import flows.pipeline
    from tasks.doctor import flow_runs
    from tests.helpers import drift_worker

    root, params, _, _, _ = loop_project(tmp_path / "project", RETRAIN)
    _labelled(root, params)
    raw = root / params.data.path
    before = len(pd.read_csv(raw))

    _crash("after-appending-rows", "drift-check", root)
    assert len(pd.read_csv(raw)) == before + 80
    mclient, exp = ledger.connect_monitoring(root, params)
    [left] = mclient.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.CHECK}'")
    assert left.data.tags["decision"] == "retrain" and left.data.tags[vocab.CLOSED] == "false"
    marker = ledger.acting(mclient, left.info.run_id)["append"]
    assert marker["rows_before"] == before and marker["outcome"]["rows_added"] == "80" and "done" not in marker

    # the killed process's flow run: Running in Prefect until the doctor sets it Crashed (once)
    killed = left.data.tags[vocab.FLOW_RUN]
    [found] = [f for f in flow_runs(root, params, repair=False) if killed in f.subject]
    assert found.check == "stale-flow-run" and found.repaired is False
    with get_client(sync_client=True) as api:
        assert api.read_flow_run(killed).state.is_running()
        assert [f.repaired for f in flow_runs(root, params, repair=True) if killed in f.subject] == [True]
        assert api.read_flow_run(killed).state.type.value == "CRASHED"
    assert not [f for f in flow_runs(root, params, repair=False) if killed in f.subject]

    monkeypatch.setattr(flows.pipeline, "training_pipeline", drift_worker.fake_training)
    drift_worker.TRAINED.clear()
    state = drift_check(project_dir=str(root), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.run_id == left.info.run_id and summary.action == "retrain"
    assert len(pd.read_csv(raw)) == before + 80  # appended once, not twice
    assert summary.outcome["rows_added"] == "80" and summary.outcome["data_revision"]
    assert drift_worker.TRAINED == [left.info.run_id]  # the retrain ran once, told which check started it
    tags = mclient.get_run(left.info.run_id).data.tags
    assert tags[vocab.CLOSED] == "true" and tags[vocab.OUTCOME_CHAMPION] == "1"
    assert ledger.acting(mclient, left.info.run_id)["append"]["done"] is True
    assert ledger.unchecked(mclient, exp) == []


@pytest.mark.slow
def test_a_crash_after_the_retrain_then_a_rerun_does_not_retrain_again(tmp_path, prefect_harness, monkeypatch):
    """Killed after the training pipeline finished (it recorded its champion on the check run) and before the
    check closed: the rerun closes the check with that outcome, appending and training nothing again."""
    import flows.pipeline
    from tests.helpers import drift_worker

    root, params, _, _, _ = loop_project(tmp_path / "project", RETRAIN)
    _labelled(root, params)
    raw = root / params.data.path
    before = len(pd.read_csv(raw))

    _crash("after-retrain", "drift-check", root, module="tests.helpers.drift_worker")
    mclient, exp = ledger.connect_monitoring(root, params)
    [left] = mclient.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.CHECK}'")
    assert left.data.tags[vocab.CLOSED] == "false" and left.data.tags[vocab.OUTCOME_CHAMPION] == "1"
    assert ledger.acting(mclient, left.info.run_id)["retrain"]["outcome"] == {"training": "completed",
                                                                              "champion": "1"}

    monkeypatch.setattr(flows.pipeline, "training_pipeline", drift_worker.fake_training)
    drift_worker.TRAINED.clear()
    state = drift_check(project_dir=str(root), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.run_id == left.info.run_id
    assert drift_worker.TRAINED == []  # not trained again
    assert summary.outcome["training"] == "completed" and summary.outcome["champion"] == "1"
    assert len(pd.read_csv(raw)) == before + 80
    assert mclient.get_run(left.info.run_id).data.tags[vocab.CLOSED] == "true"
    assert ledger.unchecked(mclient, exp) == []
