"""Promotion as one unit: compare-then-set, idempotent reruns, undo on error, crash recovery, and four promotions
racing in four processes against one sqlite MLflow store."""

from __future__ import annotations

from collections import Counter

import pytest
from typer.testing import CliRunner

from ottimo import vocab
from ottimo.cli.main import app
from ottimo.ops import doctor
from ottimo.ops.faults import EXIT_CODE
from ottimo.registry import promotion, versions
from ottimo.registry.versions import CHALLENGER, CHAMPION, PREVIOUS
from tests.conftest import seeded_harness
from tests.helpers.reliability_helpers import add_version, attempt, release, store

NAME = "ottimo-classifier"


@pytest.fixture(scope="module")
def api_url(prefect_db):
    """One Prefect API (temporary database) for this module's promotion processes: it takes long to start."""
    from prefect.settings import PREFECT_API_URL

    with seeded_harness(prefect_db):
        yield PREFECT_API_URL.value()


@pytest.fixture
def reg(tmp_path):
    root, params, client, exp = store(tmp_path / "project")
    versions = [add_version(client, exp, NAME, tmp_path / "files") for _ in range(3)]
    return root, params, client, exp, versions


def test_compare_then_set_idempotent_and_refusals(reg, tmp_path):
    _, _, client, exp, (v1, v2, v3) = reg
    assert promotion.promote(client, NAME, v1, None) == {CHAMPION: v1}
    assert promotion.promote(client, NAME, v2, v1) == {CHAMPION: v2, PREVIOUS: v1}
    since = client.get_model_version(NAME, v2).tags[vocab.CHAMPION_SINCE]

    # the same promotion again (a rerun after success) changes nothing, not even the champion history
    assert promotion.promote(client, NAME, v2, v1) == {CHAMPION: v2, PREVIOUS: v1}
    assert client.get_model_version(NAME, v2).tags[vocab.CHAMPION_SINCE] == since

    # a decision taken against v1 is stale now that v2 is champion
    with pytest.raises(promotion.ChampionChanged, match="champion of ottimo-classifier is now v2, not v1"):
        promotion.promote(client, NAME, v3, v1)
    # a version that failed the gate, or has no sha256, is never made champion
    failed = add_version(client, exp, NAME, tmp_path / "more", verdict="failed")
    unverified = add_version(client, exp, NAME, tmp_path / "more", with_sha=False)
    for bad in (failed, unverified):
        with pytest.raises(promotion.PromotionError, match="may not be champion"):
            promotion.promote(client, NAME, bad, v2)
    assert versions.aliases(client, NAME) == {CHAMPION: v2, PREVIOUS: v1}
    assert promotion.journal(client, NAME) is None
    # the doctor restores the sha256 tag from the run's record once the file is checked against it
    [found] = doctor.examine(client, exp, NAME, reg[1].reliability, repair=True)
    assert (found.check, found.subject, found.repaired) == ("sha256-missing", f"v{unverified}", True)
    assert doctor.examine(client, exp, NAME, reg[1].reliability) == []
    assert promotion.promote(client, NAME, unverified, v2) == {CHAMPION: unverified, PREVIOUS: v2}


class Flaky:
    """A fault injected on purpose: the store refuses the next `failures` moves of `champion` (a server away)."""

    def __init__(self, client, failures: int):
        self.client, self.failures = client, failures

    def __getattr__(self, attr):
        return getattr(self.client, attr)

    def set_registered_model_alias(self, name, alias, version):
        if alias == CHAMPION and self.failures:
            self.failures -= 1
            raise ConnectionError("MLflow went away")
        return self.client.set_registered_model_alias(name, alias, version)


def test_an_error_mid_move_puts_every_alias_back(reg):
    _, params, client, exp, (v1, v2, _) = reg
    promotion.promote(client, NAME, v1, None)
    client.set_registered_model_alias(NAME, CHALLENGER, v2)
    before = versions.aliases(client, NAME)
    with pytest.raises(ConnectionError):  # previous-champion was moved, champion was not: undone
        promotion.promote(Flaky(client, failures=1), NAME, v2, v1)
    assert versions.aliases(client, NAME) == before
    assert promotion.journal(client, NAME) is None

    # the store stays away while undoing too: the journal stays, and the next move finishes the promotion first
    with pytest.raises(ConnectionError) as err:
        promotion.promote(Flaky(client, failures=2), NAME, v2, v1)
    assert "its journal stays" in str(err.value.__notes__)
    assert versions.aliases(client, NAME) == before  # undoing got as far as removing previous-champion again
    assert [f.check for f in doctor.examine(client, exp, NAME, params.reliability)] == ["journal"]
    assert promotion.promote(client, NAME, v2, v1) == {CHAMPION: v2, PREVIOUS: v1, CHALLENGER: v2}
    assert promotion.journal(client, NAME) is None


def test_crash_between_alias_moves_is_found_and_finished(reg, api_url, tmp_path):
    """The promote task in its own process dies (os._exit) after moving previous-champion; `ottimo doctor` finds
    the half-done move and the run left RUNNING, --repair finishes both, and a rerun changes nothing."""
    root, _, client, exp, (v1, v2, _) = reg
    promotion.promote(client, NAME, v1, None)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    proc = attempt(root, v2, v1, barrier, api_url, crash_at="between-alias-moves")
    release(barrier, [proc])
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_CODE, out[-3000:]
    assert versions.aliases(client, NAME) == {CHAMPION: v1, PREVIOUS: v1}  # half done
    assert promotion.journal(client, NAME)["target"] == {PREVIOUS: v1, CHAMPION: v2}
    [crashed] = client.search_runs([exp], "tags.`ottimo.kind` = 'pipeline'")
    assert crashed.info.status == "RUNNING"

    cli = CliRunner()
    report = cli.invoke(app, ["doctor", "-C", str(root)])
    assert report.exit_code == 1, report.output
    assert {"journal", "stale-run", "previous-is-champion"} <= {line.split()[1] for line in report.output.splitlines()
                                                               if line.startswith("found ")}, report.output
    assert versions.aliases(client, NAME) == {CHAMPION: v1, PREVIOUS: v1}  # a report changes nothing

    fixed = cli.invoke(app, ["doctor", "-C", str(root), "--repair"])
    assert fixed.exit_code == 0, fixed.output
    assert versions.aliases(client, NAME) == {CHAMPION: v2, PREVIOUS: v1}
    assert promotion.journal(client, NAME) is None
    run = client.get_run(crashed.info.run_id)
    assert run.info.status == "FAILED" and "process died" in run.data.tags["failure"]
    clean = cli.invoke(app, ["doctor", "-C", str(root)])
    assert clean.exit_code == 0 and "consistent" in clean.output

    # the rerun: registering again finds the version of each run id, promoting again moves nothing
    mv = client.get_model_version(NAME, v2)
    assert versions.register(client, NAME, mv.source, mv.run_id, {}).version == mv.version
    assert promotion.promote(client, NAME, v2, v1) == {CHAMPION: v2, PREVIOUS: v1}
    runs = [v.run_id for v in client.search_model_versions(f"name = '{NAME}'")]
    assert len(runs) == len(set(runs)) == 3


@pytest.mark.slow  # a race of four flow-run processes, about 30 s
def test_four_promotions_at_once_make_exactly_one_champion(tmp_path, api_url):
    """Four processes, each a Prefect flow run, all decided against champion v1, released together."""
    root, params, client, exp = store(tmp_path / "project")
    v1 = add_version(client, exp, NAME, tmp_path / "files")
    promotion.promote(client, NAME, v1, None)
    candidates = [add_version(client, exp, NAME, tmp_path / "files") for _ in range(4)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [attempt(root, v, v1, barrier, api_url) for v in candidates]
    release(barrier, procs)
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    codes = Counter(p.returncode for p in procs)
    assert codes == {0: 1, 1: 3}, outputs

    winner = candidates[[p.returncode for p in procs].index(0)]
    assert versions.aliases(client, NAME) == {CHAMPION: winner, PREVIOUS: v1}
    assert promotion.journal(client, NAME) is None
    # every attempt is recorded on its own run: one promotion, three refusals naming the new champion
    runs = client.search_runs([exp], "tags.`ottimo.kind` = 'pipeline'")
    records = {r.data.tags["attempt.version"]: (r.info.status, r.data.tags["promotion"]) for r in runs}
    assert set(records) == set(candidates)
    assert records[winner] == ("FINISHED", f"promoted v{winner} (champion was v{v1})")
    for v in set(candidates) - {winner}:
        status, note = records[v]
        assert status == "FAILED" and note.startswith(f"refused v{v}: promote refused: champion of {NAME} is now "
                                                      f"v{winner}, not v{v1}"), note
    runs_of_versions = [v.run_id for v in client.search_model_versions(f"name = '{NAME}'")]
    assert len(runs_of_versions) == len(set(runs_of_versions)) == 5
    assert doctor.examine(client, exp, NAME, params.reliability) == []


def test_pipeline_start_reconciles_what_a_crash_left(reg, api_url):
    """The pipeline's first task: report only when reliability.reconcile_on_start is false, else repair."""
    import json
    import time

    from prefect import flow

    from ottimo.config import ReliabilityCfg
    from tasks.doctor import reconcile as reconcile_task

    @flow
    def reconcile(root, params) -> list[str]:
        return reconcile_task(root, params)

    root, params, client, _, (v1, v2, _) = reg
    promotion.promote(client, NAME, v1, None)
    entry = {"op": "promote", "before": {PREVIOUS: None, CHAMPION: v1}, "target": {PREVIOUS: v1, CHAMPION: v2},
             "at": time.time()}
    client.set_registered_model_tag(NAME, vocab.JOURNAL, json.dumps(entry))
    client.set_registered_model_alias(NAME, PREVIOUS, v1)  # the state a crash between the two moves leaves

    report_only = params.model_copy(update={"reliability": ReliabilityCfg(reconcile_on_start=False)})
    lines = reconcile(root, report_only)
    assert [line.split()[0] for line in lines] == ["journal", "previous-is-champion"]
    assert all(line.endswith("(not repaired)") for line in lines)
    assert versions.aliases(client, NAME) == {CHAMPION: v1, PREVIOUS: v1}

    [line] = reconcile(root, params)
    assert line.startswith("journal ") and line.endswith("(done)")
    assert versions.aliases(client, NAME) == {CHAMPION: v2, PREVIOUS: v1}
    assert reconcile(root, params) == []
