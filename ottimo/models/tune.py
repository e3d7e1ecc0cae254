"""Hyperparameter search with Optuna: samplers, pruners, the objective, resume and the choice handed to training.

A study lives in RDB storage (SQLite under mlruns/ by default) so that several workers, threads or
processes, share it and a crashed run can be resumed. Every trial trains with `ottimo.models.train.fit`, reports
val accuracy per epoch so the pruner can stop it early, and is logged to MLflow as a run nested under the
study's run. No Prefect here: tasks/tune.py and flows/tune.py schedule this.

Many processes on one server-backed study (Postgres): every worker runs a *share* of the trials, each trial tagged
with its share, so a share counts its own trials in the storage, and n_trials holds exactly. With
tune.heartbeat_seconds a worker that dies mid-trial is noticed by another (its heartbeat stops): that trial is
failed and re-run (RetryHeartbeatStaleTrialCallback), and the dead worker's unstarted trials move to the worker
that noticed. See run_trials.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from mlflow import MlflowClient
from mlflow.entities import Param
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ottimo import vocab
from ottimo.config import (
    STORAGE_PASSWORD,
    EvaluateCfg,
    FamilyCfg,
    FloatRange,
    IntRange,
    TrainCfg,
    TuneCfg,
    storage_password,
)
from ottimo.data.tables import Splits
from ottimo.models.family import FamilyError, Recipe, to_overrides
from ottimo.models.train import fit
from ottimo.onnx.export import export_guard
from ottimo.ops.faults import checkpoint
from ottimo.registry.tracking import in_project, stamped
from ottimo.spec import InputSpec

SQLITE_TIMEOUT_S = 120  # how long a writer waits for SQLite's lock before "database is locked"
INTERRUPTED = "interrupted: left RUNNING by a run that stopped (crash or kill); marked failed on resume"
SURPLUS = "surplus: its share already had all its trials when it started (two workers raced); not run"
SHARE = "ottimo.share"  # user attr: "<id>/<size>", the worker share a trial counts for (a re-run keeps it)
STORAGE_ENV = "OTTIMO_OPTUNA_STORAGE"  # overrides tune.storage (a team's Postgres without editing params.yaml)
CATCH = (FloatingPointError, FamilyError)  # a trial that raises one of these is recorded FAILED and the study goes on
OBJECTIVES = ("val_accuracy", "p95_ms")


class TuningFailed(RuntimeError):
    """A study has no completed trial although trials ran; the message names the reasons."""


# --- storage -------------------------------------------------------------------------------------------------


def storage_url(root: Path, cfg: TuneCfg) -> str:
    """OTTIMO_OPTUNA_STORAGE or tune.storage, a relative sqlite path taken from the project root; postgresql://
    means psycopg (3). A URL holding a password is refused: it would be logged."""
    url = os.environ.get(STORAGE_ENV) or cfg.storage
    if storage_password(url):
        raise ValueError(f"{STORAGE_ENV if os.environ.get(STORAGE_ENV) else 'tune.storage'} {STORAGE_PASSWORD}")
    return in_project(root, re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url))


def _sqlite_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # pysqlite starts no transaction of its own: _sqlite_begin does


def _sqlite_begin(conn) -> None:
    # Take the write lock when a transaction starts, not when it first writes: a deferred transaction that
    # read first cannot wait for the lock and fails at once with "database is locked"; this one waits.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _server_engine(url: str) -> dict:
    """Engine settings for a database server shared by many worker processes: few connections each (a worker
    uses one, its heartbeat thread another), checked before use and recycled, so a server restart or an idle
    timeout costs a reconnect, not a failed trial."""
    kwargs = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 8, "pool_recycle": 1800}
    if make_url(url).get_driver_name() in ("psycopg", "psycopg2"):  # libpq: name the client in pg_stat_activity
        kwargs["connect_args"] = {"application_name": "ottimo-optuna", "connect_timeout": 10}
    return kwargs


def _heartbeat(seconds: int | None, grace: int | None, retries: int) -> dict:
    if seconds is None:
        return {}
    return {"heartbeat_interval": seconds, "grace_period": grace,
            "heartbeat_stale_trial_callback": _RetryStale(max_retry=retries)}


@functools.cache
def open_storage(url: str, heartbeat: int | None = None, grace: int | None = None,
                 retries: int = 3) -> optuna.storages.RDBStorage:
    """One RDBStorage per URL (and heartbeat setting) and process. SQLite is made safe for parallel writers: WAL
    journal, a long busy timeout, and BEGIN IMMEDIATE transactions so that writers queue instead of failing.
    heartbeat (s): running trials beat; one silent for `grace` s (default 2 x heartbeat) is failed and re-run
    (at most `retries` times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        beat = _heartbeat(heartbeat, grace, retries)
        if not url.startswith("sqlite"):
            return _create(url, _server_engine(url), beat)
        path = make_url(url).database
        if path and path != ":memory:":
            with closing(sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)) as conn:
                conn.execute("PRAGMA journal_mode=WAL")  # persistent: readers no longer block the writer
        storage = _create(url, {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}, beat)
    event.listen(storage.engine, "connect", _sqlite_connect)
    event.listen(storage.engine, "begin", _sqlite_begin)
    storage.engine.dispose()  # connections opened while the tables were created lack the listeners
    return storage


def _create(url: str, engine_kwargs: dict, beat: dict, attempts: int = 3) -> optuna.storages.RDBStorage:
    """RDBStorage, tried again when workers starting together race to create Optuna's tables on a fresh database."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **beat)
        except SQLAlchemyError as err:
            if attempt == attempts - 1:
                raise RuntimeError(f"cannot open the Optuna storage {make_url(url).render_as_string()}: "
                                   f"{type(err).__name__}: {str(err).splitlines()[0]}. Is the server up, the "
                                   f"database created, and the password in the file PGPASSFILE names?") from err
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def study_name(cfg: TuneCfg, family: str, revision: str) -> str:
    """One study per family and data revision (and objective): new data starts a new search."""
    return f"{cfg.study_name}-{family}-{revision[:8]}" + ("-mo" if cfg.multi_objective else "")


# --- sampler, pruner, search space ---------------------------------------------------------------------------


def _values(spec: FloatRange | IntRange | list, points: int) -> list:
    """The grid of one parameter: a list as is, an int range stepped, a float range at `points` values."""
    if isinstance(spec, list):
        return list(spec)
    if isinstance(spec, IntRange):
        return list(range(spec.low, spec.high + 1, spec.step))
    space = np.geomspace if spec.log else np.linspace
    return sorted({float(v) for v in space(spec.low, spec.high, points)})


def _scalar(v) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def grid(cfg: TuneCfg, fam: FamilyCfg) -> dict[str, list]:
    return {name: [v if _scalar(v) else json.dumps(v) for v in _values(spec, cfg.grid_points)]
            for name, spec in fam.searched().items()}


def make_sampler(cfg: TuneCfg, fam: FamilyCfg, seed: int) -> optuna.samplers.BaseSampler:
    """tpe | random | grid | nsga2; multi-objective studies always use NSGA-II."""
    if cfg.multi_objective or cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid(cfg, fam), seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=cfg.startup_trials, seed=seed)


def make_pruner(cfg: TuneCfg, fam: FamilyCfg) -> optuna.pruners.BasePruner:
    """hyperband | asha (= successive_halving) | median | none, on epochs; none for multi-objective studies,
    which Optuna cannot prune."""
    if cfg.multi_objective or cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "hyperband":
        budget = fam.trial_epochs
        return optuna.pruners.HyperbandPruner(
            min_resource=min(cfg.min_epochs, budget), max_resource=budget, reduction_factor=cfg.reduction_factor)
    if cfg.pruner in ("asha", "successive_halving"):
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.min_epochs,
                                                      reduction_factor=cfg.reduction_factor)
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.min_epochs)


def suggest(trial: Trial, fam: FamilyCfg) -> dict:
    """Ask the trial for one value of every setting of the family's search space (families.<name>.space)."""
    out = {}
    for name, spec in fam.searched().items():
        if isinstance(spec, list):  # Optuna stores scalars: a choice such as [16, 32] travels as its JSON text
            out[name] = trial.suggest_categorical(name, [v if _scalar(v) else json.dumps(v) for v in spec])
        elif isinstance(spec, IntRange):
            out[name] = trial.suggest_int(name, spec.low, spec.high, step=spec.step)
        else:
            out[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    return decode(fam, out)


def decode(fam: FamilyCfg, values: dict) -> dict:
    """A trial's stored values as the family takes them (JSON texts of list choices back to lists)."""
    space = fam.searched()
    return {k: json.loads(v) if isinstance(space.get(k), list) and isinstance(v, str) and not any(
        v == c for c in space[k]) else v for k, v in values.items()}


# --- study ---------------------------------------------------------------------------------------------------


def _n_trials(storage: optuna.storages.BaseStorage, name: str) -> int:
    try:
        return storage.get_n_trials(storage.get_study_id_from_name(name))
    except KeyError:
        return 0


def open_study(url: str, name: str, cfg: TuneCfg, fam: FamilyCfg, seed: int, worker: int = 0) -> optuna.Study:
    """Create the study or load it (load_if_exists). The sampler's seed mixes in the worker index and the
    trials already there, so that workers and resumed runs do not replay the same random draws."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is logged by the tasks instead
    storage = open_storage(url, cfg.heartbeat_seconds, cfg.grace_seconds, cfg.stale_retries)
    sampler = make_sampler(cfg, fam, seed + 1009 * worker + _n_trials(storage, name))
    directions = ["maximize", "minimize"] if cfg.multi_objective else ["maximize"]
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=make_pruner(cfg, fam),
                               directions=directions, load_if_exists=True)


def fail_interrupted(url: str, name: str) -> list[int]:
    """Mark trials left RUNNING by a run that died as FAIL (user attr fail_reason=INTERRUPTED); return their
    numbers. Call it before any worker starts: a study has one tuning run at a time."""
    storage = open_storage(url)
    study_id = storage.get_study_id_from_name(name)
    numbers = []
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "fail_reason", INTERRUPTED)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        numbers.append(t.number)
    return numbers


def _interrupted(t: FrozenTrial) -> bool:
    return t.user_attrs.get("fail_reason") == INTERRUPTED


def _replaced(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials the heartbeat failed and a retry replaced (Optuna's retry_history on the retries)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The finished trials that count towards n_trials: not interrupted, not replaced by a retry, not surplus."""
    gone = _replaced(trials)
    return [t for t in trials if t.state.is_finished() and t.number not in gone and not _interrupted(t)
            and t.user_attrs.get("fail_reason") != SURPLUS]


def remaining(study: optuna.Study, n_trials: int) -> int:
    """Trials still to run for the study to hold `n_trials` finished ones (interrupted, replaced and surplus
    ones do not count)."""
    return max(0, n_trials - len(counted(study.get_trials(deepcopy=False))))


def shares(n: int, n_jobs: int) -> list[int]:
    """n trials split over at most n_jobs workers as evenly as possible: shares(10, 4) == [3, 3, 2, 2]."""
    k = min(n, n_jobs)
    return [n // k + (i < n % k) for i in range(k)] if k else []


def deadline(cfg: TuneCfg) -> float | None:
    """time.time() after which no trial starts (tune.timeout_seconds from now), or None."""
    return None if cfg.timeout_seconds is None else time.time() + cfg.timeout_seconds


_threads_lock = threading.Lock()
_threads = {"users": 0, "saved": 0}  # workers inside torch_threads, and the thread count they found


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's (process-wide) intra-op threads set to n while trials run: n_jobs trials of tiny models on
    two cores run far faster on one thread each than fighting over both. The last worker out restores it."""
    with _threads_lock:
        if not _threads["users"]:
            _threads["saved"] = torch.get_num_threads()
        _threads["users"] += 1
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _threads_lock:
            _threads["users"] -= 1
            if not _threads["users"]:
                torch.set_num_threads(_threads["saved"])


class _Surplus(Exception):
    """A new trial that no share of this worker needs (recorded FAIL with SURPLUS, not counted, not run)."""


_found_lock = threading.Lock()
_found: dict[str, list[str]] = {}  # study name -> shares whose worker this process found dead (heartbeat)


class _RetryStale(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose heartbeat stopped (a WAITING copy, same params and user attrs, so the
    same share), and the dead worker's share handed to this process: only the process whose call failed the
    trial gets here, so exactly one worker takes the share over."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        super().__call__(study, trial)
        if SHARE in trial.user_attrs:
            with _found_lock:
                _found.setdefault(study.study_name, []).append(trial.user_attrs[SHARE])


def _take_found(name: str) -> list[str]:
    with _found_lock:
        return _found.pop(name, [])


def _needed(trials: list[FrozenTrial], share: str) -> int:
    """Trials the share still has to start: its size less its counted, running and waiting (retry) trials."""
    ok = {t.number for t in counted(trials)}
    mine = [t for t in trials if t.user_attrs.get(SHARE) == share
            and (t.number in ok or t.state in (TrialState.RUNNING, TrialState.WAITING))]
    return int(share.rsplit("/", 1)[1]) - len(mine)


def _next_share(trials: list[FrozenTrial], shares_: list[str]) -> str | None:
    return next((s for s in shares_ if _needed(trials, s) > 0), None)


def _has_work(study: optuna.Study, shares_: list[str]) -> bool:
    """A share still needs a new trial, or a retry of one of these shares waits to be run."""
    trials = study.get_trials(deepcopy=False)
    return _next_share(trials, shares_) is not None or any(
        t.state == TrialState.WAITING and t.user_attrs.get(SHARE) in shares_ for t in trials)


def _tagging(study: optuna.Study, objective: Callable, shares_: list[str]) -> Callable:
    """The objective, run for the first of `shares_` that needs a trial; a retry keeps the share it came from."""

    def run(trial: Trial):
        if SHARE not in trial.user_attrs:
            share = _next_share(study.get_trials(deepcopy=False), shares_)
            if share is None:
                trial.set_user_attr("fail_reason", SURPLUS)
                raise _Surplus(SURPLUS)
            trial.set_user_attr(SHARE, share)
        return objective(trial)

    return run


def _heartbeat_interval(study: optuna.Study) -> int | None:
    """The storage's heartbeat interval in seconds; None when it has none (off, or not an RDB storage)."""
    get = getattr(study._storage, "get_heartbeat_interval", None)  # BaseHeartbeat: RDBStorage and its cache
    return get() if get else None


def _late(until: float | None) -> bool:
    return until is not None and time.time() >= until


SLACK_S = 60  # clock difference allowed between worker machines when telling this run's trials from older ones


def _busy(trials: list[FrozenTrial], since: float) -> tuple:
    """What other workers of this run still do: their running trials, and the shares (seen on trials started
    since `since`) that still lack trials, e.g. a worker between two trials. Empty: everyone is done."""
    running = frozenset(t.number for t in trials if t.state == TrialState.RUNNING)
    recent = {t.user_attrs[SHARE] for t in trials if SHARE in t.user_attrs and t.datetime_start
              and t.datetime_start.timestamp() >= since - SLACK_S}
    return running, frozenset(s for s in recent if _needed(trials, s) > 0)


def _watch(study: optuna.Study, until: float | None, since: float) -> bool:
    """This worker's shares are done and other workers of the run are not: check on their heartbeats until they
    are. True as soon as this process found one dead (its retry and unstarted trials are now this worker's);
    False when all are done, at `until`, or when nothing has moved for 10 grace periods (a worker that died
    between two trials, or before its trial's first beat, leaves no stale trial: the next run's
    fail_interrupted and remaining() see to it)."""
    interval = _heartbeat_interval(study)
    grace = getattr(getattr(study._storage, "_backend", study._storage), "grace_period", None)  # RDBStorage's
    patience = 10 * (grace or 2 * interval)
    seen, moved = None, time.time()
    while not _late(until) and time.time() - moved < patience:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # the stale-trial callback runs here: _RetryStale
        with _found_lock:
            if _found.get(study.study_name):
                return True
        trials = study.get_trials(deepcopy=False)
        busy = _busy(trials, since)
        if not any(busy):
            return False
        if (busy, len(trials)) != seen:
            seen, moved = (busy, len(trials)), time.time()
        time.sleep(interval)
    return False


def run_trials(study: optuna.Study, objective: Callable, n_trials: int, until: float | None,
               on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
               share: str | None = None) -> list[int]:
    """Run this worker's share of n_trials trials, none starting after `until`; a trial raising one of CATCH is
    recorded FAILED and the next one starts. `on_trial` sees each finished trial (progress). Returns their numbers.

    Every trial is tagged with the share ("<share>/<n_trials>"; `share` names it, e.g. flow run and worker index,
    so that a re-run of the same share only runs what it lacks; default: a fresh id), and the share counts its
    trials in the storage, not in this process. With the storage's heartbeat on, a worker done with its share
    watches the others' running trials; the process that finds one dead re-runs it and the rest of that share."""
    if n_trials <= 0 or _late(until):
        return []
    mine = [f"{share or uuid.uuid4().hex[:12]}/{n_trials}"]
    heartbeat, since = _heartbeat_interval(study), time.time()
    numbers: list[int] = []

    def done(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("fail_reason") == SURPLUS:
            return
        numbers.append(trial.number)
        if on_trial:
            on_trial(trial)

    while not _late(until):
        mine += _take_found(study.study_name)
        if not _has_work(study, mine):
            if heartbeat and _watch(study, until, since):
                continue
            break
        study.optimize(_tagging(study, objective, mine), n_trials=1, catch=(*CATCH, _Surplus), callbacks=[done])
    return numbers


# --- the objective -------------------------------------------------------------------------------------------


@dataclass
class TrialRuns:
    """MLflow side of the trials: one run per trial, nested under the study's run."""

    client: MlflowClient
    experiment_id: str
    study_run_id: str
    tags: dict[str, str]

    def start(self, trial: Trial, params: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags={
            **self.tags, vocab.PARENT: self.study_run_id, vocab.KIND: vocab.TRIAL,
            "optuna.trial": str(trial.number), "trial.state": "running"})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        return run.info.run_id

    def finish(self, run_id: str, rows: list[dict], state: str, values: list[float] | None, reason: str) -> None:
        now = int(time.time() * 1000)
        metrics = [m for r in rows for m in stamped({k: v for k, v in r.items() if k != "epoch"}, int(r["epoch"]), now)]
        metrics += stamped({**dict(zip(("best_val_accuracy", "p95_ms"), values or [], strict=False)),
                            "epochs": len(rows)}, now=now)
        for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[i:i + 900])
        self.client.set_tag(run_id, "trial.state", state)
        if reason:
            self.client.set_tag(run_id, "trial.pruned" if state == "pruned" else vocab.FAILURE, vocab.clip(reason))
        # a pruned trial did its job (the pruner stopped it early on purpose): FINISHED, told apart by its tag
        self.client.set_terminated(run_id, "FINISHED" if state in ("complete", "pruned") else "FAILED")


def onnx_p95_ms(model, spec: InputSpec, X: np.ndarray, cfg: EvaluateCfg) -> float:
    """p95 latency at batch 1 of the model exported to ONNX, in onnxruntime (ottimo.onnx.export + ottimo.onnx.measure).
    Trials training beside it share the CPUs, so compare these figures within a study, not with `evaluate`."""
    from ottimo.onnx.export import export_onnx
    from ottimo.onnx.measure import latency_ms, session

    with export_guard.exclusive(), tempfile.TemporaryDirectory(prefix="ottimo-trial-") as tmp:
        path = export_onnx(model, spec, Path(tmp) / "model.onnx")
        return latency_ms(session(path, cfg.threads), X, cfg.warmup, cfg.runs)[1]


def objective(base: Recipe, fam: FamilyCfg, splits: Splits, train: TrainCfg, cfg: TuneCfg, evaluate: EvaluateCfg,
              seed: int, runs: TrialRuns | None = None) -> Callable[[Trial], float | tuple[float, float]]:
    """The function Optuna calls per trial: train the family (its recipe `base` with the suggested values) for the
    family's trial_epochs; maximise best val accuracy (and, multi-objective, minimise ONNX p95 at batch 1)."""
    budget, family = fam.trial_epochs, base.family
    train_cfg = train.model_copy(update={"max_epochs": budget})

    def run(trial: Trial) -> float | tuple[float, float]:
        p = suggest(trial, fam)
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")  # which process ran it
        recipe = base.overridden(to_overrides(p))
        run_id = runs.start(trial, {"family": family, **p, "epochs_budget": budget, "seed": seed}) if runs else ""
        rows: list[dict] = []
        state, values, reason = "failed", None, ""

        def on_epoch(row: dict) -> None:
            rows.append(row)
            if not cfg.multi_objective:
                trial.report(row["val_accuracy"], int(row["epoch"]))
                if row["epoch"] < budget and trial.should_prune():  # at the budget there is nothing left to save
                    raise optuna.TrialPruned(f"epoch {int(row['epoch'])}: val_accuracy {row['val_accuracy']:.4f}")

        try:
            with export_guard.training():  # another trial may be exporting (multi-objective)
                result = fit(recipe, splits, train_cfg, seed, on_epoch)
            checkpoint("mid-tuning")  # trained, not yet recorded: a crash here leaves the trial RUNNING
            values = [result.best_val_accuracy]
            if cfg.multi_objective:
                values.append(onnx_p95_ms(result.model, splits.input, splits.X_val, evaluate))
            state = "complete"
            return values[0] if len(values) == 1 else (values[0], values[1])
        except optuna.TrialPruned as err:
            state, reason = "pruned", str(err)
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            trial.set_user_attr("fail_reason", reason[:2000])
            raise
        finally:
            trial.set_user_attr("epochs", len(rows))
            if runs:
                runs.finish(run_id, rows, state, values, reason)

    return run


# --- the result ----------------------------------------------------------------------------------------------


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "epochs": sum(int(t.user_attrs.get("epochs", len(t.intermediate_values))) for t in trials),
    }


def choose(study: optuna.Study, cfg: TuneCfg, family: str = "<name>") -> FrozenTrial | None:
    """The trial whose settings train the candidate: the best val accuracy; multi-objective, the fastest
    Pareto trial within max_accuracy_drop points of the best accuracy. None when no trial ran at all (the
    wall budget was spent first); TuningFailed when trials ran and none completed."""
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        ran = counted(trials)
        if not ran:
            return None
        failed = [t for t in ran if t.state == TrialState.FAIL]
        first = f"; trial {failed[0].number}: {failed[0].user_attrs.get('fail_reason', '?')}" if failed else ""
        raise TuningFailed(
            f"study {study.study_name}: no trial completed ({len(failed)} failed, {len(ran) - len(failed)} pruned)"
            f"{first}. Narrow families.{family}.space in params.yaml (e.g. lower lr or weight_decay) and run again.")
    if not cfg.multi_objective:
        return study.best_trial
    front = pareto_front(study)
    top = max(t.values[0] for t in front)
    within = [t for t in front if t.values[0] >= top - cfg.max_accuracy_drop / 100 - 1e-12]
    return min(within, key=lambda t: (t.values[1], -t.values[0], t.number))


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials no other trial beats on both accuracy and latency, by accuracy."""
    return sorted(study.best_trials, key=lambda t: (-t.values[0], t.values[1]))


def save_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optuna's matplotlib plots as PNG files; a plot that needs more trials than there are is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    multi = len(study.directions) > 1
    acc = {"target": (lambda t: t.values[0]), "target_name": "val_accuracy"} if multi else {}
    plots = {
        "optimization_history": lambda: vis.plot_optimization_history(study, **acc),
        "param_importances": lambda: vis.plot_param_importances(study, **acc),
        "intermediate_values": lambda: vis.plot_intermediate_values(study),
    }
    if multi:
        plots["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=list(OBJECTIVES))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning, and too-few-trials notices
            try:
                ax = plot()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
        fig = np.ravel(ax)[0].figure
        fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / f"{name}.png")
    return paths
