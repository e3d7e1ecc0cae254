"""Optuna on a real PostgreSQL cluster with many worker processes: exact n_trials, and a worker killed mid-trial
whose trial the heartbeat fails and re-runs (ottimo.models.tune.run_trials, ottimo.ops.postgres)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ottimo.config import Params, TuneCfg
from ottimo.models import tune
from ottimo.ops.postgres import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
WORKER = Path(__file__).resolve().parents[1] / "helpers" / "optuna_worker.py"


def _study(postgres: Cluster, monkeypatch, name: str, cfg: TuneCfg) -> tuple[str, optuna.Study]:
    monkeypatch.setenv("PGPASSFILE", str(postgres.pgpass_file))
    url = postgres.create_database("optuna")
    assert "psycopg" in url and postgres.password_file.read_text().strip() not in url
    return url, tune.open_study(url, name, cfg, Params().families["mlp"], 0)  # tables and study made once, here


def _spawn(url: str, name: str, share: str, n: int, sleep: float, beat: int = 0, grace: int = 0,
           hang_at: int = -1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), url, name, share, str(n), str(sleep), str(beat),
                             str(grace), str(hang_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[str, str]]:
    out = [p.communicate(timeout=timeout) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [e[-2000:] for _, e in out]
    return out


def test_eight_processes_make_exactly_n_trials(postgres: Cluster, monkeypatch):
    n, jobs = 40, 8
    url, study = _study(postgres, monkeypatch, "eight", TuneCfg())
    started = time.time()
    procs = [_spawn(url, "eight", f"run1/{w}", k, 0.15) for w, k in enumerate(tune.shares(n, jobs))]
    out = _finish(procs)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == n and sorted(t.number for t in trials) == list(range(n))  # none lost, none twice
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: n}  # none RUNNING, none failed
    assert len({t.user_attrs["pid"] for t in trials}) == jobs  # every process took part
    assert Counter(t.user_attrs[tune.SHARE] for t in trials) == {f"run1/{w}/5": 5 for w in range(jobs)}
    assert tune.remaining(study, n) == 0
    assert not any(e.strip() for _, e in out), [e for _, e in out if e.strip()]  # no error, no lock warning
    print(f"8 processes, {n} trials in {time.time() - started:.1f} s")


def test_a_killed_worker_s_trial_is_failed_by_the_heartbeat_and_rerun(postgres: Cluster, monkeypatch):
    """3 workers x 3 trials; worker 0 is SIGKILLed in its second trial while the others run. A survivor notices
    its heartbeat stopped (grace 3 s), fails that trial, re-runs it and the dead worker's unstarted third trial:
    9 counted trials."""
    n, beat, grace = 9, 1, 3
    cfg = TuneCfg(heartbeat_seconds=beat, grace_seconds=grace)
    url, study = _study(postgres, monkeypatch, "killed", cfg)
    victim = _spawn(url, "killed", "run1/0", 3, 0.3, beat, grace, hang_at=1)
    line = victim.stdout.readline()  # in its second trial: the others start now (import times vary under load)
    assert line.startswith("HANG"), (line, victim.stderr.read()[-2000:] if victim.poll() is not None else "")
    hung = int(line.split()[1])
    survivors = [_spawn(url, "killed", f"run1/{w}", 3, 0.3, beat, grace) for w in (1, 2)]
    deadline = time.time() + 120
    while len(study.get_trials(deepcopy=False)) <= hung + 1 and time.time() < deadline:  # a survivor's trial
        time.sleep(0.1)
    assert study.get_trials(deepcopy=False)[hung].state == TrialState.RUNNING  # still beating: alive so far
    os.kill(victim.pid, signal.SIGKILL)  # mid-trial, while the others run theirs
    victim.wait(10)
    _finish(survivors)

    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    assert sorted(by_number) == list(range(len(trials)))  # unique numbers, no gap
    assert by_number[hung].state == TrialState.FAIL  # failed by the heartbeat, not left RUNNING
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == hung]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == by_number[hung].params  # the same configuration, run again
    assert retries[0].user_attrs["pid"] != victim.pid and retries[0].user_attrs[tune.SHARE] == "run1/0/3"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    counted = tune.counted(trials)
    assert len(counted) == n and len(trials) == n + 1  # the dead trial is the one extra, and it does not count
    assert Counter(t.user_attrs[tune.SHARE] for t in counted) == {f"run1/{w}/3": 3 for w in range(3)}
    assert tune.remaining(study, n) == 0
