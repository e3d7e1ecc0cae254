"""Optuna with many worker processes on one study: PostgreSQL against SQLite, side by side in one run.

`processes` worker processes (spawned, each opening the storage itself the way a Dask or Prefect worker does)
share one study of `trials` trials through ottimo.models.tune.run_trials, each its share (tune.shares). The
clock starts when every worker has imported and opened the study, and stops when the last one is done, so the
figures are the storage's, not Python's start-up. Backends, one after the other on the same disk:

- postgres: a throw-away cluster of our own (ottimo.ops.postgres, fsync on), psycopg, password from PGPASSFILE
- sqlite: ottimo's SQLite storage (WAL, BEGIN IMMEDIATE, 120 s busy timeout)
- sqlite-plain: Optuna's RDBStorage on the same kind of file with its defaults (what a user gets without ottimo)

The objective is cheap (no torch: a few suggested values, `sleep_ms` of work in 3 reported steps, TPE sampler,
median pruner) so that the storage dominates; `--real` trains the MLP family on the default data instead
(2 epochs a trial). Per backend: finished trials per minute, worker errors (lock errors among them), lost
trials (fewer counted than asked), duplicated numbers, trials left RUNNING.

    .venv/bin/python bench/optuna_scale.py                       # 8 processes x 80 trials, cheap objective
    .venv/bin/python bench/optuna_scale.py --processes 4 --trials 24 --backends postgres sqlite
    .venv/bin/python bench/optuna_scale.py --real --trials 16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("postgres", "sqlite", "sqlite-plain")
LOCK_WORDS = ("locked", "deadlock", "could not serialize", "lock timeout")


def _cheap(sleep_ms: float):
    def objective(trial) -> float:
        x = trial.suggest_float("x", -5, 5)
        y = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        k = trial.suggest_categorical("width", [16, 32, 64])
        value = -(x - 1) ** 2 - (y - 0.01) ** 2 + k / 64
        for step in range(3):  # like epochs: one report (a write) and one pruning check (a read) each
            time.sleep(sleep_ms / 3000)
            trial.report(value * (step + 1) / 3, step)
            if trial.should_prune():
                import optuna

                raise optuna.TrialPruned()
        return value

    return objective


def _real(data_dir: str):
    from ottimo.config import load_params
    from ottimo.data.tables import load_splits
    from ottimo.models import tune
    from ottimo.models.family import recipe

    params = load_params(REPO / "params.yaml")
    fam = params.families["mlp"].model_copy(update={"trial_epochs": 2})
    return tune.objective(recipe(params.families, params.train, "mlp"), fam, load_splits(Path(data_dir)),
                          params.train, params.tune, params.evaluate, params.project.seed)


def _study(url: str, plain: bool, worker: int):
    import optuna

    from ottimo.config import Params, TuneCfg
    from ottimo.models import tune

    cfg = TuneCfg(sampler="tpe", pruner="median", startup_trials=4)
    if not plain:
        return tune.open_study(url, "bench", cfg, Params().families["mlp"], 0, worker)
    return optuna.load_study(study_name="bench", storage=optuna.storages.RDBStorage(url),
                             sampler=optuna.samplers.TPESampler(n_startup_trials=4, seed=worker),
                             pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1))


def _worker(url: str, plain: bool, worker: int, n: int, sleep_ms: float, real: str, ready, start, out) -> None:
    """One worker process: open the study, wait for the start signal, run its share, report back."""
    import optuna

    from ottimo.models import tune

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    errors: list[str] = []
    ran: list[int] = []
    try:
        study = _study(url, plain, worker)
        objective = _real(real) if real else _cheap(sleep_ms)
        ready.put(worker)
        start.wait()
        with tune.torch_threads(1):
            ran = tune.run_trials(study, objective, n, None, share=f"bench/{worker}")
    except Exception as err:  # a storage error ends this worker: counted, and its missing trials show as lost
        errors.append(f"{type(err).__name__}: {err}"[:300])
        traceback.print_exc()
        ready.put(worker)
    out.put({"worker": worker, "ran": len(ran), "errors": errors, "end": time.time()})


def _measure(url: str, plain: bool, processes: int, trials: int, sleep_ms: float, real: str) -> dict:
    import optuna

    from ottimo.models import tune

    # tables and study made once, here; the plain arm's file must not get ottimo's WAL journal from this
    storage = optuna.storages.RDBStorage(url) if plain else tune.open_storage(url)
    optuna.create_study(study_name="bench", storage=storage, direction="maximize")
    ctx = mp.get_context("spawn")
    ready, out, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(url, plain, w, n, sleep_ms, real, ready, start, out))
             for w, n in enumerate(tune.shares(trials, processes))]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    t0 = time.time()
    start.set()
    results = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join(60)
    wall = max(r["end"] for r in results) - t0
    study = optuna.load_study(study_name="bench", storage=storage)
    all_trials = study.get_trials(deepcopy=False)
    numbers = Counter(t.number for t in all_trials)
    errors = [e for r in results for e in r["errors"]]
    finished = tune.counted(all_trials)
    return {"trials/min": len(finished) / wall * 60, "wall_s": wall, "finished": len(finished),
            "pruned": sum(t.state.name == "PRUNED" for t in all_trials), "errors": len(errors),
            "lock_errors": sum(any(w in e.lower() for w in LOCK_WORDS) for e in errors),
            "lost": max(0, trials - len(finished)), "duplicated": sum(c - 1 for c in numbers.values()),
            "running_left": sum(t.state.name == "RUNNING" for t in all_trials), "first_error": errors[:1]}


def _prepared(folder: Path) -> str:
    from ottimo.config import load_params
    from ottimo.data.tables import materialise_raw, prepare

    params = load_params(REPO / "params.yaml")
    materialise_raw(folder, params.data)
    prepare(folder, params.data, folder / "prepared")
    return str(folder / "prepared")


def run(processes: int = 8, trials: int = 80, sleep_ms: float = 20, backends: tuple[str, ...] = BACKENDS,
        real: bool = False) -> list[dict]:
    """One row per backend: {"backend", "trials/min", "wall_s", "finished", "pruned", "errors", "lock_errors",
    "lost", "duplicated", "running_left", "first_error"}."""
    from ottimo.ops import postgres

    folder = Path(tempfile.mkdtemp(prefix="ottimo-bench-optuna-"))
    rows = []
    try:
        data = _prepared(folder) if real else ""
        for backend in backends:
            if backend == "postgres":
                with postgres.temporary(durable=True) as cluster:
                    os.environ.update(cluster.env())  # the spawned workers inherit it
                    row = _measure(cluster.create_database("optuna"), False, processes, trials, sleep_ms, data)
            else:
                db = folder / f"{backend}.db"
                row = _measure(f"sqlite:///{db}", backend == "sqlite-plain", processes, trials, sleep_ms, data)
            rows.append({"backend": backend, **row})
            print(table(rows[-1:], header=len(rows) == 1), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


COLUMNS = ("backend", "trials/min", "wall_s", "finished", "pruned", "errors", "lock_errors", "lost", "duplicated",
           "running_left")


def table(rows: list[dict], header: bool = True) -> str:
    def cell(v) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = [" | ".join(f"{c:>12}" for c in COLUMNS)] if header else []
    lines += [" | ".join(f"{cell(r[c]):>12}" for c in COLUMNS) + (f"   first error: {r['first_error'][0]}"
                                                                  if r["first_error"] else "") for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--trials", type=int, default=80, help="trials in the study, over all processes")
    ap.add_argument("--sleep-ms", type=float, default=20, help="work per cheap trial (3 reported steps)")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--real", action="store_true", help="train the MLP (2 epochs a trial) instead of the cheap one")
    args = ap.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    work = "the MLP on the default data" if args.real else f"a cheap objective ({args.sleep_ms:g} ms a trial)"
    print(f"{args.processes} processes, {args.trials} trials, {work}; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")
    rows = run(args.processes, args.trials, args.sleep_ms, tuple(args.backends), args.real)
    by = {r["backend"]: r for r in rows}
    if "postgres" in by and "sqlite" in by:
        ratio = by["postgres"]["trials/min"] / by["sqlite"]["trials/min"]
        print(f"postgres / sqlite trials per minute: {ratio:.2f}x")
    print(f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
