"""The production loop on the hardened paths: rollback and manual promotion through ottimo.registry.promotion (lock,
journal, compare-then-set), racing alias moves, a half-done rollback repaired, and the bad-input corpus replayed
as incoming batches through the real scoring flow (quarantined, named; champion and data versions untouched)."""

from __future__ import annotations

import shutil

import pytest

from flows.score import batch_scoring
from ottimo import vocab
from ottimo.ops import doctor
from ottimo.ops.faults import EXIT_CODE
from ottimo.registry import promotion, versions
from ottimo.registry.versions import CHAMPION, PREVIOUS
from tests.helpers import bad_inputs
from tests.helpers.loop_helpers import alias_worker, loop_project
from tests.helpers.reliability_helpers import add_version, release, store

NAME = "ottimo-classifier"


@pytest.fixture
def reg(tmp_path):
    """v1 -> v2 promoted (v2 champion, v1 previous-champion), v3 registered and servable."""
    root, params, client, exp = store(tmp_path / "project")
    v1, v2, v3 = (add_version(client, exp, NAME, tmp_path / "files") for _ in range(3))
    promotion.promote(client, NAME, v1, None)
    promotion.promote(client, NAME, v2, v1)
    return root, params, client, exp, (v1, v2, v3)


def test_rollback_is_a_journaled_compare_then_set_move(reg):
    _, params, client, exp, (v1, v2, v3) = reg
    assert promotion.rollback(client, NAME, "drift", v2, "check-1") == {CHAMPION: v1, PREVIOUS: v2}
    assert "replaced by v" + v1 in client.get_model_version(NAME, v2).tags[vocab.ROLLED_BACK]
    assert "restored over v" + v2 in client.get_model_version(NAME, v1).tags[vocab.RESTORED]
    assert promotion.journal(client, NAME) is None
    # the same decision again (a rerun after a crash) changes nothing; another decision on v2 is stale now
    assert promotion.rollback(client, NAME, "drift", v2, "check-1") == {CHAMPION: v1, PREVIOUS: v2}
    with pytest.raises(promotion.ChampionChanged, match="champion of ottimo-classifier is now v1, not v2"):
        promotion.rollback(client, NAME, "drift", v2, "check-2")
    # a former champion that a gate later failed may still be rolled back to (its sha256 is what counts) ...
    client.set_model_version_tag(NAME, v2, vocab.GATE_VERDICT, vocab.FAILED)
    assert promotion.rollback(client, NAME, "back again") == {CHAMPION: v2, PREVIOUS: v1}
    # ... never one without a sha256, and never without a previous-champion
    client.delete_model_version_tag(NAME, v1, "sha256")
    with pytest.raises(promotion.PromotionError, match="no sha256"):
        promotion.rollback(client, NAME, "unverified")
    client.delete_registered_model_alias(NAME, PREVIOUS)
    with pytest.raises(promotion.NoPreviousChampion, match="nothing changed"):
        promotion.rollback(client, NAME, "nothing to go back to")
    assert versions.aliases(client, NAME) == {CHAMPION: v2}


def test_promote_and_rollback_race_one_wins_the_other_is_refused(reg, tmp_path):
    root, params, client, exp, (v1, v2, v3) = reg
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [alias_worker(root, "promote", v3, v2, barrier), alias_worker(root, "rollback", "-", v2, barrier)]
    release(barrier, procs)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    won = "promote" if procs[0].returncode == 0 else "rollback"
    assert "champion of ottimo-classifier is now" in outs[1 if won == "promote" else 0]
    expected = {CHAMPION: v3, PREVIOUS: v2} if won == "promote" else {CHAMPION: v1, PREVIOUS: v2}
    assert versions.aliases(client, NAME) == expected
    assert promotion.journal(client, NAME) is None and doctor.examine(client, exp, NAME, params.reliability) == []


def _kill_a_rollback(root, champion: str, tmp_path, point: str) -> None:
    """A rollback in its own process, decided on `champion`, killed at crash point `point`."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    proc = alias_worker(root, "rollback", "-", champion, barrier, crash_at=point)
    release(barrier, [proc])
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_CODE, out


@pytest.mark.slow
def test_a_rollback_killed_between_its_alias_moves_is_finished_by_the_doctor(reg, tmp_path):
    root, params, client, exp, (v1, v2, v3) = reg
    _kill_a_rollback(root, v2, tmp_path, "between-alias-moves")
    assert versions.aliases(client, NAME) == {CHAMPION: v1, PREVIOUS: v1}  # cut in two
    assert promotion.journal(client, NAME)["op"] == "rollback"
    found = doctor.examine(client, exp, NAME, params.reliability)
    assert [(f.check, f.repaired) for f in found][:1] == [("journal", False)] and "finish" in found[0].action
    doctor.examine(client, exp, NAME, params.reliability, repair=True)
    assert versions.aliases(client, NAME) == {CHAMPION: v1, PREVIOUS: v2}
    assert doctor.examine(client, exp, NAME, params.reliability) == []


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["doctor", "rerun"])
def test_a_rollback_killed_after_its_alias_moves_keeps_its_tags(reg, tmp_path, resume):
    """The rolled_back/restored tags are part of the move: killed after the aliases moved and before the tags,
    the journal still holds them; the doctor's repair or the same decision rerun writes them, and swaps nothing."""
    root, params, client, exp, (v1, v2, v3) = reg
    _kill_a_rollback(root, v2, tmp_path, "before-rollback-tags")
    assert versions.aliases(client, NAME) == {CHAMPION: v1, PREVIOUS: v2}  # moved, ...
    assert vocab.ROLLED_BACK not in client.get_model_version(NAME, v2).tags  # ... not yet tagged
    entry = promotion.journal(client, NAME)
    assert entry["op"] == "rollback" and {k for _, k, _ in entry["tags"]} == {
        vocab.ROLLED_BACK, vocab.RESTORED, vocab.ROLLBACK_BY}
    decision = next(x for _, k, x in entry["tags"] if k == vocab.ROLLBACK_BY)
    if resume == "doctor":
        found = doctor.examine(client, exp, NAME, params.reliability, repair=True)
        assert [(f.check, f.repaired) for f in found] == [("journal", True)]
    else:
        assert promotion.rollback(client, NAME, "again", v2, decision) == {CHAMPION: v1, PREVIOUS: v2}
    assert versions.aliases(client, NAME) == {CHAMPION: v1, PREVIOUS: v2}  # swapped once, not back
    tags2, tags1 = client.get_model_version(NAME, v2).tags, client.get_model_version(NAME, v1).tags
    assert "replaced by v" + v1 in tags2[vocab.ROLLED_BACK] and tags2[vocab.ROLLBACK_BY] == decision
    assert "restored over v" + v2 in tags1[vocab.RESTORED]
    assert promotion.journal(client, NAME) is None and doctor.examine(client, exp, NAME, params.reliability) == []
    assert promotion.rollback(client, NAME, "again", v2, decision) == {CHAMPION: v1, PREVIOUS: v2}


def _fingerprint(root, client):
    return versions.aliases(client, NAME), (root / "dvc.lock").read_bytes(), (root / "data" / "raw").exists() and \
        sorted(p.name for p in (root / "data" / "raw").iterdir())


def test_the_bad_input_corpus_as_incoming_batches(tmp_path, prefect_harness):
    """One scoring run over every bad batch of the corpus and the good ones: each bad batch is moved to the
    quarantine with a reason naming its problem, each good batch is scored, registry and data stay as they were."""
    root, params, client, exp, _ = loop_project(tmp_path / "project", {"limits": {"max_rows": 5000}}, versions=2)
    incoming = root / params.score.incoming
    incoming.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    good = bad_inputs.good_frame().drop(columns=[bad_inputs.TARGET]).head(300)
    labelled = bad_inputs.good_frame()
    bad, fine = {}, []
    for case in bad_inputs.DATA:
        path = case.write(incoming / f"{case.id}{case.suffix}", labelled, tmp_path / "outside")
        if case.batch_expect:
            bad[case.id] = (path, case)
        else:
            fine.append(path)
    good.to_parquet(incoming / "zz-good.parquet")
    fine.append(incoming / "zz-good.parquet")
    before = _fingerprint(root, client)

    state = batch_scoring(project_dir=str(root), return_state=True)

    assert state.is_failed() and f"{len(bad)} batch(es) quarantined" in state.message, state.message
    folder = root / params.limits.quarantine_dir
    for case_id, (path, case) in bad.items():
        assert not path.exists() and not path.is_symlink(), f"{case_id} is still in {incoming}"
        [note] = folder.glob(f"{path.name}.*.reason.txt")
        for fragment in case.batch_expect:
            assert fragment in note.read_text(), f"{case_id}: {fragment!r} not in {note.read_text()}"
        assert case_id + case.suffix in state.message
    for path in fine:
        assert (incoming / (path.stem + ".predictions.parquet")).is_file(), f"{path.name} was not scored"
    assert _fingerprint(root, client) == before
    shutil.rmtree(tmp_path / "outside")
