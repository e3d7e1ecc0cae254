"""Crash and resume in the production loop (slow): `ottimo score` dies after its first batch of three, `ottimo
drift-check` dies after it has decided and before it acts; the rerun finishes the job, scoring every batch exactly
once and taking the one decision once. Points: ottimo.ops.faults.LOOP_POINTS."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

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


def _crash(point: str, command: str, root) -> None:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_API_URL=PREFECT_API_URL.value(), OTTIMO_CRASH_AT=point,
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "ottimo.cli", command, "-C", str(root)], env=env,
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
    root, params, client, _, _ = loop_project(tmp_path / "project", SMALL, versions=2)
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
    if summary.action != "rollback":
        assert versions.aliases(client, name) == aliases
    assert not mclient.search_runs([exp], "attributes.status = 'RUNNING'")
