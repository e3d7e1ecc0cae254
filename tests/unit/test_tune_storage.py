"""Optuna storage settings and share accounting (ottimo.models.tune) on SQLite: the storage URL's sources and
password rule, a share that counts its trials in the storage, and a dead worker's share taken over through the
heartbeat. The same on Postgres with real processes: tests/system/test_optuna_postgres.py."""

from __future__ import annotations

import time
import warnings
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from ottimo.config import ConfigError, Params, TuneCfg, parse_params
from ottimo.models import tune


def test_storage_url_env_override_driver_and_no_password(tmp_path, monkeypatch):
    cfg = TuneCfg()
    assert tune.storage_url(tmp_path, cfg) == f"sqlite:///{tmp_path.resolve()}/mlruns/optuna.db"
    monkeypatch.setenv(tune.STORAGE_ENV, "postgresql://ottimo@127.0.0.1:5432/optuna")
    assert tune.storage_url(tmp_path, cfg) == "postgresql+psycopg://ottimo@127.0.0.1:5432/optuna"
    monkeypatch.setenv(tune.STORAGE_ENV, "postgresql+psycopg://ottimo:s3cret@db:5432/optuna")
    with pytest.raises(ValueError, match="OTTIMO_OPTUNA_STORAGE holds a password.*PGPASSFILE") as err:
        tune.storage_url(tmp_path, cfg)
    assert "s3cret" not in str(err.value)


def test_bad_storage_and_heartbeat_settings_are_named():
    for patch, key, fragment in [
        ({"storage": "postgresql://u:pw@h/db"}, "tune.storage", "PGPASSFILE"),
        ({"grace_seconds": 10}, "tune", "needs tune.heartbeat_seconds"),
        ({"heartbeat_seconds": 10, "grace_seconds": 5}, "tune", "longer than it"),
        ({"heartbeat_seconds": 0}, "tune.heartbeat_seconds", "greater than or equal to 1"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_params({"tune": patch})
        assert f"- {key}" in str(err.value) and fragment in str(err.value), str(err.value)
        assert "pw@" not in str(err.value)


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0, 1)


def _open(tmp_path, name: str, cfg: TuneCfg) -> optuna.Study:
    return tune.open_study(f"sqlite:///{tmp_path}/optuna.db", name, cfg, Params().families["mlp"], 0)


def test_a_share_counts_its_trials_in_the_storage(tmp_path):
    """Run again (a task retry, a worker rescheduled), a share only runs what it lacks: n_trials holds."""
    study = _open(tmp_path, "share", TuneCfg())
    assert len(tune.run_trials(study, _objective, 3, None, share="flow/0")) == 3
    assert tune.run_trials(study, _objective, 3, None, share="flow/0") == []
    assert len(tune.run_trials(study, _objective, 2, None, share="flow/1")) == 2
    assert Counter(t.user_attrs[tune.SHARE] for t in study.trials) == {"flow/0/3": 3, "flow/1/2": 2}


def test_a_dead_worker_s_share_is_taken_over_through_the_heartbeat(tmp_path):
    """A trial of share dead/2 stops beating (its worker died): the next worker fails it after the grace period,
    re-runs it and runs the share's unstarted trial, besides its own 2. 4 counted trials, the dead one not."""
    study = _open(tmp_path, "beat", TuneCfg(heartbeat_seconds=1, grace_seconds=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Heartbeat ... supposed to be used with Study.optimize"
        dead = study.ask()
    dead.suggest_float("x", 0, 1)
    dead.set_user_attr(tune.SHARE, "dead/2")
    study._storage.record_heartbeat(dead._trial_id)  # one beat, then silence
    time.sleep(2.5)
    ran = tune.run_trials(study, _objective, 2, time.time() + 60, share="alive")
    trials = study.trials
    assert trials[0].state == TrialState.FAIL and len(ran) == 4
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert Counter(t.user_attrs[tune.SHARE] for t in tune.counted(trials)) == {"dead/2": 2, "alive/2": 2}
    assert tune.remaining(study, 4) == 0 and len(trials) == 5
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_without_heartbeat_a_dead_trial_waits_for_the_next_run(tmp_path):
    """No heartbeat: nobody fails a silent trial during the run; fail_interrupted does at the next one."""
    study = _open(tmp_path, "nobeat", TuneCfg())
    study.ask().set_user_attr(tune.SHARE, "dead/1")
    assert len(tune.run_trials(study, _objective, 2, None, share="alive")) == 2
    assert study.trials[0].state == TrialState.RUNNING
    assert tune.fail_interrupted(f"sqlite:///{tmp_path}/optuna.db", "nobeat") == [0]
    assert tune.remaining(study, 3) == 1


def test_a_worker_between_two_trials_keeps_the_watchers_watching(tmp_path):
    """No trial runs, but share other/2 of this run has one trial of two: its worker is between trials, so a
    worker done with its own share goes on checking heartbeats; an older run's unfinished share does not count."""
    study = _open(tmp_path, "between", TuneCfg())
    since = time.time()
    t = study.ask()
    t.set_user_attr(tune.SHARE, "other/2")
    study.tell(t, 0.5)
    assert tune._busy(study.trials, since) == (frozenset(), frozenset({"other/2"}))
    assert tune._busy(study.trials, since + 2 * tune.SLACK_S) == (frozenset(), frozenset())
