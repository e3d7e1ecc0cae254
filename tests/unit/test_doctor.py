"""The doctor's truth table: registry states a crash can leave, what it reports, what --repair makes of them, and
that a second look finds nothing more. One sqlite store for the module; each test its own model and experiment."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import pytest

from ottimo import vocab
from ottimo.config import ReliabilityCfg
from ottimo.ops.doctor import examine, owner, owner_alive
from ottimo.registry import promotion, versions
from ottimo.registry.versions import CHALLENGER, CHAMPION, PREVIOUS
from tests.helpers.reliability_helpers import add_version, store

CFG = ReliabilityCfg(stale_run_hours=1)
DEAD = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0.0})  # a pid since reused
ELSEWHERE = json.dumps({"host": "another-host", "pid": 1, "started": 0.0})


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return store(tmp_path_factory.mktemp("doctor") / "project")


@pytest.fixture
def case(shared, tmp_path):
    """(client, experiment, model name, add(**kw) -> version) on a fresh model and experiment."""
    _, _, client, _ = shared
    name = f"m-{uuid.uuid4().hex[:8]}"
    exp = client.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    return client, exp, name, lambda **kw: add_version(client, exp, name, tmp_path / "files", **kw)


def checks(client, exp, name, repair=False):
    return [(f.check, f.repaired) for f in examine(client, exp, name, CFG, repair)]


def test_owner_liveness():
    assert owner_alive(owner()) is True
    assert owner_alive(DEAD) is False
    assert owner_alive(ELSEWHERE) is None and owner_alive(None) is None


def test_consistent_registry_has_no_findings(case):
    client, exp, name, add = case
    v1, v2 = add(), add()
    promotion.promote(client, name, v1, None)
    client.set_registered_model_alias(name, CHALLENGER, v2)
    add(status="RUNNING", tags={vocab.OWNER: owner()})  # a run in progress in a live process is left alone
    assert checks(client, exp, name) == []


def test_missing_champion_is_restored_from_the_champion_history(case):
    client, exp, name, add = case
    v1, v2 = add(), add()
    promotion.promote(client, name, v1, None)
    promotion.promote(client, name, v2, v1)
    client.delete_registered_model_alias(name, CHAMPION)
    assert checks(client, exp, name) == [("champion-missing", False)]
    assert checks(client, exp, name, repair=True) == [("champion-missing", True)]
    assert versions.aliases(client, name) == {CHAMPION: v2, PREVIOUS: v1}
    assert checks(client, exp, name) == []


def test_deleted_champion_version_falls_back_to_the_one_before(case):
    client, exp, name, add = case
    v1, v2 = add(), add()
    promotion.promote(client, name, v1, None)
    promotion.promote(client, name, v2, v1)
    client.delete_model_version(name, v2)
    assert checks(client, exp, name, repair=True) == [("champion-missing", True)]
    assert versions.aliases(client, name) == {CHAMPION: v1}


def test_never_promoted_is_reported_not_guessed(case):
    client, exp, name, add = case
    add()
    assert checks(client, exp, name, repair=True) == [("champion-missing", None)]
    assert versions.aliases(client, name) == {}


def test_previous_equal_to_champion_points_back_at_the_champion_before(case):
    client, exp, name, add = case
    v1, v2, v3 = add(), add(), add()
    for new, old in ((v1, None), (v2, v1), (v3, v2)):
        promotion.promote(client, name, new, old)
    client.set_registered_model_alias(name, PREVIOUS, v3)
    assert checks(client, exp, name, repair=True) == [("previous-is-champion", True)]
    assert versions.aliases(client, name) == {CHAMPION: v3, PREVIOUS: v2}


def test_challenger_without_verdict_whose_run_died(case):
    client, exp, name, add = case
    v1, v2 = add(), add(verdict="failed")
    v3 = add(verdict="pending", status="FAILED")
    promotion.promote(client, name, v1, None)
    client.set_registered_model_alias(name, CHALLENGER, v3)
    assert checks(client, exp, name) == [("pending-verdict", False), ("challenger-unknown", False)]
    checks(client, exp, name, repair=True)
    assert vocab.tag(client.get_model_version(name, v3).tags, vocab.GATE_VERDICT) == vocab.ABANDONED
    assert versions.aliases(client, name) == {CHAMPION: v1, CHALLENGER: v2}  # the latest version with a verdict
    assert checks(client, exp, name) == []


def test_runs_left_running_by_dead_processes_are_failed(case):
    client, exp, name, add = case
    crashed = add(verdict="pending", status="RUNNING", tags={vocab.OWNER: DEAD})
    live = add(verdict="pending", status="RUNNING", tags={vocab.OWNER: owner()})
    old_elsewhere = add(status="RUNNING", tags={vocab.OWNER: ELSEWHERE}, start_time=int((time.time() - 7200) * 1000))
    new_elsewhere = add(status="RUNNING", tags={vocab.OWNER: ELSEWHERE})
    promotion.promote(client, name, old_elsewhere, None)
    assert sorted(checks(client, exp, name, repair=True)) == [
        ("pending-verdict", True), ("stale-run", True), ("stale-run", True)]
    status = {v: client.get_run(client.get_model_version(name, v).run_id).info.status
              for v in (crashed, live, old_elsewhere, new_elsewhere)}
    assert status == {crashed: "FAILED", live: "RUNNING", old_elsewhere: "FAILED", new_elsewhere: "RUNNING"}
    run = client.get_run(client.get_model_version(name, crashed).run_id)
    assert "process died" in run.data.tags["failure"]
    assert vocab.tag(client.get_model_version(name, crashed).tags, vocab.GATE_VERDICT) == vocab.ABANDONED
    assert vocab.tag(client.get_model_version(name, live).tags, vocab.GATE_VERDICT) == "pending"  # still being gated


def test_unverifiable_version_is_reported_and_left_alone(case):
    client, exp, name, add = case
    v1 = add(with_sha=False)
    client.delete_tag(client.get_model_version(name, v1).run_id, "onnx.sha256")
    assert checks(client, exp, name, repair=True) == [("sha256-missing", None), ("champion-missing", None)]
    assert "sha256" not in client.get_model_version(name, v1).tags


def test_half_done_move_to_an_unservable_version_is_undone(case):
    client, exp, name, add = case
    v1, bad = add(), add(verdict="failed")
    promotion.promote(client, name, v1, None)
    entry = {"op": "promote", "before": {PREVIOUS: None, CHAMPION: v1}, "target": {PREVIOUS: v1, CHAMPION: bad},
             "at": time.time()}
    client.set_registered_model_tag(name, vocab.JOURNAL, json.dumps(entry))
    client.set_registered_model_alias(name, PREVIOUS, v1)
    assert checks(client, exp, name, repair=True) == [("journal", True)]
    assert versions.aliases(client, name) == {CHAMPION: v1}
    assert promotion.journal(client, name) is None


def test_a_flow_run_is_stale_when_its_owner_process_is_gone():
    """The decision behind setting Prefect flow runs Crashed: only when an owner is known dead and none alive."""
    from ottimo.ops.doctor import FlowRun, process_gone, stale_flow_runs

    assert process_gone([DEAD]) and process_gone([DEAD, ELSEWHERE])
    assert not process_gone([]) and not process_gone([ELSEWHERE]) and not process_gone([DEAD, owner()])
    runs = [FlowRun("a", "killed"), FlowRun("b", "alive"), FlowRun("c", "unknown"),
            FlowRun("d", "killed retrain", drift_check_run="check-1")]
    owners = {"a": [DEAD], "b": [owner()], "d": [DEAD]}
    assert [(f.check, f.subject, f.repaired) for f in stale_flow_runs(runs, owners, None)] == [
        ("stale-flow-run", "flow run a (killed)", False), ("stale-flow-run", "flow run d (killed retrain)", False)]
    crashed = []
    found = stale_flow_runs(runs, owners, lambda run, message: crashed.append((run.id, message)))
    assert [f.repaired for f in found] == [True, True] and [c[0] for c in crashed] == ["a", "d"]
    assert "process died" in crashed[0][1] and "drift check check-1" in found[1].action
