"""Tuning: search space to TrainCfg, pruning, NaN trials, multi-objective choice, SQLite under parallel writers,
resume after a crash, the Dask runner, a study where every trial fails, and the pipeline training the tuned config.

Every test has its own project folder, Optuna storage and MLflow store. The flow tests share one temporary
Prefect API (`harness`, module-scoped: starting one takes 10-20 s on two busy cores).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from ottimo import vocab
from ottimo.cli.main import app
from ottimo.config import TRAIN_KEYS, ConfigError, Params, TuneCfg, deep_merge, load_params, parse_params
from ottimo.data import versioning
from ottimo.data.tables import Splits, load_splits, materialise_raw, prepare
from ottimo.models import tune
from ottimo.models.family import Recipe, build, recipe, to_overrides
from ottimo.registry.tracking import connect
from ottimo.spec import InputSpec
from tasks.data import DataVersion
from tests.conftest import seeded_harness, write_project

REPO = Path(__file__).resolve().parents[2]
REV = "0123abcd"  # data revision of the projects prepared here without DVC


@pytest.fixture(scope="module")
def harness(prefect_db):
    with seeded_harness(prefect_db, timeout=90):
        yield


def make(tmp_path: Path, tune_cfg: dict | None = None, extra: dict | None = None, mlp: dict | None = None
         ) -> tuple[Path, Params, DataVersion]:
    """A project tuning only the MLP (TINY settings plus `tune_cfg`, and `mlp` laid over families.mlp), its data
    prepared without DVC."""
    root = write_project(tmp_path / "project", deep_merge({"train": {"candidates": ["mlp"]}, "tune": tune_cfg or {},
                                                       "families": {"mlp": mlp or {}}}, extra or {}))
    params = load_params(root / "params.yaml")
    materialise_raw(root, params.data)
    prepare(root, params.data, root / "data" / "prepared")
    return root, params, DataVersion(REV, str(root / "data" / "prepared"), True)


def run_study(root: Path, params: Params, runs: tune.TrialRuns | None = None) -> optuna.Study:
    """The core loop without Prefect: one worker, every trial in this process."""
    cfg = params.tune
    url = tune.storage_url(root, cfg)
    fam = params.families["mlp"]
    study = tune.open_study(url, tune.study_name(cfg, "mlp", REV), cfg, fam, params.project.seed)
    splits: Splits = load_splits(root / "data" / "prepared")
    objective = tune.objective(recipe(params.families, params.train, "mlp"), fam, splits, params.train, cfg,
                               params.evaluate, params.project.seed, runs)
    with tune.torch_threads(1):
        tune.run_trials(study, objective, cfg.n_trials, None)
    return study


def by_state(study: optuna.Study, state: TrialState) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == state]


# --- config and search space (fast) --------------------------------------------------------------------------


def test_repo_params_tune_before_training_and_bad_tune_values_are_named():
    params = load_params(REPO / "params.yaml")
    assert params.tune.enabled and params.tune.sampler == "tpe" and params.tune.pruner == "hyperband"
    assert params.tune.storage.startswith("sqlite:///mlruns/")
    for patch, key, fragment in [
        ({"tune": {"sampler": "cmaes"}}, "tune.sampler", "'grid'"),
        ({"tune": {"pruner": "asha2"}}, "tune.pruner", "'successive_halving'"),
        ({"tune": {"storage": "mlruns/optuna.db"}}, "tune.storage", "SQLAlchemy URL"),
        ({"tune": {"space": {"mlp": {}}}}, "tune.space", "moved to families.<name>.space"),
        ({"families": {"mlp": {"space": {"lr": {"low": 0, "high": 0.1, "log": True}}}}}, "families.mlp.space.lr",
         "low > 0"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_params(patch)
        assert f"- {key}:" in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("family", ["mlp", "transformer", "cnn"])
def test_every_suggestion_is_a_valid_train_config_and_the_grid_is_finite(family):
    cfg = TuneCfg(sampler="grid", grid_points=2)
    params = Params()
    fam, spec = params.families[family], InputSpec("image", (1, 8, 8), "float32")
    grid = tune.grid(cfg, fam)
    assert grid["lr"][0] == fam.space["lr"].low and len(grid["lr"]) == 2
    study = optuna.create_study(direction="maximize", sampler=tune.make_sampler(cfg, fam, 0))
    for _ in range(5):
        trial = study.ask()
        p = tune.suggest(trial, fam)
        assert all(trial.params[k] in v for k, v in grid.items())
        r = recipe(params.families, params.train, family, to_overrides(p))
        assert r.batch_size == p["batch_size"] and r.lr == p["lr"]
        assert all(r.hparams[k] == v for k, v in p.items() if k not in TRAIN_KEYS)  # list choices decoded
        build(r, spec, 10)  # d_model / heads / ff_dim / channels fit together
        study.tell(trial, 0.5)
    assert isinstance(tune.make_pruner(cfg, fam), optuna.pruners.HyperbandPruner)
    assert isinstance(tune.make_pruner(cfg.model_copy(update={"pruner": "asha"}), fam),
                      optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(tune.make_sampler(cfg.model_copy(update={"multi_objective": True}), fam, 0),
                      optuna.samplers.NSGAIISampler)
    assert tune.shares(10, 4) == [3, 3, 2, 2] and tune.shares(1, 4) == [1] and tune.shares(0, 2) == []


def test_multi_objective_choice_is_the_fastest_pareto_trial_within_the_allowed_drop():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, p95 in [(0.97, 0.30), (0.965, 0.10), (0.95, 0.05), (0.96, 0.20), (0.90, 0.50)]:
        study.add_trial(optuna.trial.create_trial(values=[acc, p95]))
    assert [t.number for t in tune.pareto_front(study)] == [0, 1, 2]  # 3 and 4 are dominated by 1
    pick = {drop: tune.choose(study, TuneCfg(multi_objective=True, max_accuracy_drop=drop)).number
            for drop in (0.0, 1.0, 2.0)}
    assert pick == {0.0: 0, 1.0: 1, 2.0: 2}


def test_the_wall_budget_stops_starting_trials_and_keeps_the_best():
    study = optuna.create_study(direction="maximize")

    def slow(trial: optuna.Trial) -> float:
        time.sleep(0.2)
        return trial.suggest_float("x", 0, 1)

    assert tune.choose(study, TuneCfg()) is None  # nothing ran: training keeps params.yaml
    assert tune.run_trials(study, slow, 5, time.time() - 1) == [] and not study.trials
    ran = tune.run_trials(study, slow, 100, time.time() + 1.0)
    assert 2 <= len(ran) < 100 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert tune.choose(study, TuneCfg()).value == max(t.value for t in study.trials)


# --- the core loop on real training -------------------------------------------------------------------------


def test_hyperband_prunes_weak_trials_and_every_trial_is_a_nested_mlflow_run(tmp_path):
    root, params, _ = make(tmp_path, {"n_trials": 10}, mlp={"trial_epochs": 9})
    client, exp = connect(root, params.mlflow)
    parent = client.create_run(exp, run_name="study").info.run_id
    study = run_study(root, params, tune.TrialRuns(client, exp, parent, {"test": "pruning"}))

    pruned, complete = by_state(study, TrialState.PRUNED), by_state(study, TrialState.COMPLETE)
    assert pruned and complete and len(pruned) + len(complete) == 10
    assert all(t.user_attrs["epochs"] < 9 for t in pruned)  # stopped before the budget
    assert tune.counts(study)["epochs"] < 10 * 9
    assert tune.choose(study, params.tune).number == study.best_trial.number

    runs = {r.data.tags["optuna.trial"]: r for r in client.search_runs([exp], "tags.`ottimo.kind` = 'trial'")}
    assert len(runs) == 10
    for t in study.trials:
        run = runs[str(t.number)]
        state, status = {"COMPLETE": ("complete", "FINISHED"), "PRUNED": ("pruned", "FINISHED")}[t.state.name]
        assert (run.data.tags["trial.state"], run.info.status) == (state, status)
        assert ("epoch" in run.data.tags["trial.pruned"]) if state == "pruned" else "trial.pruned" not in run.data.tags
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.params["lr"] == str(t.params["lr"])
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(1, t.user_attrs["epochs"] + 1))


def test_a_nan_trial_is_recorded_failed_and_the_study_goes_on(tmp_path):
    # weight decay up to 1e6 blows the weights up to inf within an epoch or two: real NaN losses
    root, params, _ = make(tmp_path, {"n_trials": 6, "sampler": "random", "pruner": "none"}, mlp={
        "trial_epochs": 2, "space": {"weight_decay": {"low": 1e-6, "high": 1e6, "log": True}}})
    study = run_study(root, params)
    failed, complete = by_state(study, TrialState.FAIL), by_state(study, TrialState.COMPLETE)
    assert failed and complete and len(failed) + len(complete) == 6
    assert all("FloatingPointError" in t.user_attrs["fail_reason"] and "loss became" in t.user_attrs["fail_reason"]
               for t in failed)
    assert all(t.params["weight_decay"] * t.params["lr"] > 1 for t in failed)  # AdamW's decay step overshoots
    assert tune.choose(study, params.tune).state == TrialState.COMPLETE


def test_multi_objective_trials_measure_onnx_latency_and_plot_the_front(tmp_path):
    root, params, _ = make(tmp_path, {"n_trials": 3, "multi_objective": True, "population_size": 2},
                           mlp={"trial_epochs": 2})
    study = run_study(root, params)
    assert study.study_name.endswith("-mo") and len(by_state(study, TrialState.COMPLETE)) == 3
    assert all(0 < t.values[0] <= 1 and 0 < t.values[1] < 100 for t in study.trials)  # accuracy, p95 ms
    chosen = tune.choose(study, params.tune)
    assert chosen in tune.pareto_front(study)
    names = {p.name for p in tune.save_plots(study, tmp_path / "plots")}
    assert {"pareto_front.png", "optimization_history.png"} <= names


HAMMER = textwrap.dedent("""
    import sys
    import optuna
    from ottimo.models.tune import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="hammer", storage=open_storage(sys.argv[1]))

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        for step in range(5):  # every report is a write transaction
            trial.report(x * step, step)
        trial.set_user_attr("writer", sys.argv[2])
        return x

    study.optimize(objective, n_trials=15, n_jobs=3)
""")


@pytest.mark.slow  # a stress test of parallel SQLite writers, about 16 s
def test_parallel_writers_on_sqlite_do_not_lock(tmp_path):
    """2 processes x 3 threads write one study while another connection holds SQLite's write lock for 6 s,
    longer than the 5 s SQLite waits by default. With optuna's plain SQLite storage writers then fail with
    "database is locked" (tried: both processes died of it); with open_storage every writer waits its turn."""
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    optuna.create_study(study_name="hammer", storage=tune.open_storage(url), direction="maximize")
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, url, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    holder = sqlite3.connect(db, isolation_level=None, timeout=60)
    deadline = time.time() + 120
    while holder.execute("SELECT count(*) FROM trials").fetchone()[0] < 3 and time.time() < deadline:
        time.sleep(0.05)
    holder.execute("BEGIN IMMEDIATE")
    time.sleep(6)
    holder.execute("COMMIT")
    holder.close()
    outputs = [p.communicate(timeout=150)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert not any("locked" in out for out in outputs), outputs
    trials = optuna.load_study(study_name="hammer", storage=tune.open_storage(url)).trials
    assert len(trials) == 30 and all(t.state == TrialState.COMPLETE and len(t.intermediate_values) == 5
                                     for t in trials)
    assert sorted(t.number for t in trials) == list(range(30))
    assert {t.user_attrs["writer"] for t in trials} == {"0", "1"}


# --- flows ---------------------------------------------------------------------------------------------------

CRASH = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from ottimo.models import tune
    from ottimo.models.family import recipe
    from ottimo.config import load_params
    from ottimo.data.tables import load_splits
    from ottimo.registry.tracking import connect

    root = Path(sys.argv[1]); params = load_params(root / "params.yaml"); cfg = params.tune
    client, exp = connect(root, params.mlflow)
    runs = tune.TrialRuns(client, exp, client.create_run(exp, run_name="tune-mlp").info.run_id, {})
    real_fit, calls = tune.fit, []

    def fit_that_dies_in_the_third_trial(recipe, splits, train_cfg, seed, on_epoch):
        calls.append(recipe)
        def hook(row):
            if len(calls) == 3:
                os._exit(3)  # the process dies mid-trial: no cleanup, the trial stays RUNNING
            on_epoch(row)
        return real_fit(recipe, splits, train_cfg, seed, hook)

    tune.fit = fit_that_dies_in_the_third_trial
    fam = params.families["mlp"]
    study = tune.open_study(tune.storage_url(root, cfg), tune.study_name(cfg, "mlp", sys.argv[2]), cfg, fam, 42)
    objective = tune.objective(recipe(params.families, params.train, "mlp"), fam,
                               load_splits(root / "data" / "prepared"), params.train, cfg, params.evaluate, 42, runs)
    tune.run_trials(study, objective, 5, None)
""")


def test_resume_after_a_crash_continues_the_same_study_with_parallel_trials(tmp_path, harness):
    from flows.tune import with_runner

    root, params, data = make(tmp_path, {"n_trials": 5, "n_jobs": 2}, mlp={"trial_epochs": 3})
    crashed = subprocess.run([sys.executable, "-c", CRASH, str(root), REV], capture_output=True, text=True)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    url, name = tune.storage_url(root, params.tune), tune.study_name(params.tune, "mlp", REV)
    before = optuna.load_study(study_name=name, storage=tune.open_storage(url)).trials
    assert [t.state for t in before][2] == TrialState.RUNNING and all(t.state.is_finished() for t in before[:2])

    state = with_runner(str(root))(project_dir=str(root), data=data, return_state=True)  # 2 threads, SQLite
    assert state.is_completed(), state.message
    result = state.result()["mlp"]
    after = optuna.load_study(study_name=name, storage=tune.open_storage(url)).trials
    assert [t.number for t in after] == list(range(6))  # no duplicate number
    assert after[2].state == TrialState.FAIL and after[2].user_attrs["fail_reason"] == tune.INTERRUPTED
    for old, new in zip(before[:2], after[:2], strict=True):  # nothing completed before the crash is lost or rerun
        assert (new.state, new.value, new.params) == (old.state, old.value, old.params)
    assert all(t.state.is_finished() and t.state != TrialState.FAIL for t in after[3:])
    assert result.complete + result.pruned == 5 and result.failed == 1
    assert {t.user_attrs["worker"] for t in after[3:]} == {f"{os.uname().nodename}:{os.getpid()}"}  # threads

    client, exp = connect(root, params.mlflow)
    crashed = client.get_run(after[2].user_attrs["mlflow_run_id"])  # its MLflow run and study run failed too
    assert (crashed.info.status, crashed.data.tags["trial.state"]) == ("FAILED", "failed")
    assert client.get_run(crashed.data.tags["mlflow.parentRunId"]).info.status == "FAILED"
    study_run = client.get_run(result.mlflow_run_id)
    assert study_run.data.tags["optuna.interrupted"] == "2" and study_run.data.tags[vocab.FLOW_RUN]
    assert study_run.data.tags["optuna.chosen_trial"] == str(result.trial)
    assert {"plots/optimization_history.png", "plots/intermediate_values.png"} <= {
        a.path for a in client.list_artifacts(result.mlflow_run_id, "plots")}
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{result.mlflow_run_id}'")
    assert sorted(r.data.tags["optuna.trial"] for r in trials) == ["3", "4", "5"]
    assert all(r.info.status in {"FINISHED", "KILLED"} for r in trials)

    again = with_runner(str(root))(project_dir=str(root), data=data, return_state=True)  # nothing left to run
    assert again.is_completed() and len(optuna.load_study(study_name=name, storage=tune.open_storage(url)).trials) == 6


@pytest.mark.slow  # about 25 s: a LocalCluster of two worker processes
def test_dask_task_runner_runs_trials_on_two_worker_processes(tmp_path, harness):
    from flows.tune import with_runner

    root, params, data = make(tmp_path, {"runner": "dask", "n_jobs": 2, "n_trials": 4}, mlp={"trial_epochs": 2})
    state = with_runner(str(root))(project_dir=str(root), data=data, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()["mlp"]
    assert result.complete + result.pruned == 4 and result.overrides["hparams"]["width"]
    study = optuna.load_study(study_name=result.study, storage=tune.open_storage(tune.storage_url(root, params.tune)))
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)


def test_ottimo_tune_fails_with_the_reason_when_every_trial_fails(tmp_path, harness):
    # run as `ottimo tune`: the flow validates and versions the data itself, then every trial's loss is NaN
    root = write_project(tmp_path / "project", {"train": {"candidates": ["mlp"]}, "tune": {"n_trials": 2},
                                                "families": {"mlp": {"trial_epochs": 2, "space": {
                                                    "weight_decay": {"low": 1e10, "high": 1e12, "log": True}}}}})
    out = CliRunner().invoke(app, ["tune", "--project-dir", str(root)])
    assert out.exit_code == 1
    text = " ".join(out.output.split())
    assert "Tuning Failed" in text and "no trial completed (2 failed, 0 pruned)" in text
    assert "families.mlp.space" in text
    client, exp = connect(root, load_params(root / "params.yaml").mlflow)
    study_run = client.search_runs([exp], "tags.`ottimo.kind` = 'study'")[0]
    assert study_run.info.status == "FAILED" and "loss became" in study_run.data.tags["failure"]
    assert study_run.data.tags["data.revision"] == versioning.revision(root)  # DVC's, from the flow's own prepare
    trials = client.search_runs([exp], "tags.`ottimo.kind` = 'trial'")
    assert len(trials) == 2 and {(r.data.tags["trial.state"], r.info.status) for r in trials} == {("failed", "FAILED")}


def test_pipeline_with_tuning_trains_the_chosen_configuration(tmp_path, harness):
    from flows.pipeline import training_pipeline

    project = write_project(tmp_path / "project", {"tune": {"enabled": True, "n_jobs": 2}})
    params = load_params(project / "params.yaml")
    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    client, exp = connect(project, params.mlflow)
    storage = tune.open_storage(tune.storage_url(project, params.tune))
    studies = client.search_runs([exp], "tags.`ottimo.kind` = 'study'")
    assert {r.data.tags["model.family"] for r in studies} == {"mlp", "transformer"}
    for study_run in studies:
        family = study_run.data.tags["model.family"]
        assert study_run.data.tags["mlflow.parentRunId"] == summary.run_id  # nested under the pipeline run
        study = optuna.load_study(study_name=study_run.data.tags["optuna.study"], storage=storage)
        assert len(study.trials) == 3
        chosen = study.trials[int(study_run.data.tags["optuna.chosen_trial"])]
        assert study_run.data.metrics["best_val_accuracy"] == chosen.value
        expected = recipe(params.families, params.train, family,
                          to_overrides(tune.decode(params.families[family], chosen.params)))
        candidate = client.search_runs([exp], f"tags.`ottimo.kind` = 'candidate' and tags.`model.family` = '{family}'"
                                       f" and tags.`mlflow.parentRunId` = '{summary.run_id}'")[0]
        assert candidate.data.tags["tuned"] == "true"
        assert candidate.data.params["batch_size"] == str(chosen.params["batch_size"])
        logged = mlflow.artifacts.load_text(f"runs:/{candidate.info.run_id}/recipe.json")
        assert Recipe.from_json(logged) == expected  # what trained it is the chosen trial's configuration
        trial_runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'")
        assert len(trial_runs) == 3
    champion = next(c for c in summary.candidates if str(c["version"]) == summary.champion)
    assert champion["family"] in {"mlp", "transformer"}
