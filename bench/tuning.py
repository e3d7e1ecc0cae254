"""What pruning buys: TPE + Hyperband against random search without pruning, same trials, same seeds.

On the default data (params.yaml's data set, prepared into a temporary folder) and the family's search space
(`families.<name>.space`, one trial's budget `trial_epochs`), for each
seed the two arms run one after the other in this process (the order alternates between seeds), each trial
seeded the same way and trained on `tune.threads_per_trial` torch threads, one trial at a time, on a fresh
SQLite study. Printed per arm: best val accuracy, epochs trained over all trials (pruned ones included),
wall time; then the means over seeds and the ratios. The goal: Hyperband within 0.5 points of the
random-search best while training <= 40% of its epochs.

    .venv/bin/python bench/tuning.py                           # 3 seeds x 24 trials, MLP
    .venv/bin/python bench/tuning.py --seeds 1 --trials 6      # quick check
    .venv/bin/python bench/tuning.py --family transformer
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from ottimo.config import Params, load_params
from ottimo.data.tables import Splits, load_splits, materialise_raw, prepare
from ottimo.models import tune
from ottimo.models.family import recipe

REPO = Path(__file__).resolve().parent.parent
ARMS = {"tpe+hyperband": ("tpe", "hyperband"), "random, no pruning": ("random", "none")}
MAX_DROP_POINTS, MAX_EPOCH_SHARE = 0.5, 0.40


def run_arm(folder: Path, params: Params, splits: Splits, family: str, arm: str, trials: int, seed: int) -> dict:
    sampler, pruner = ARMS[arm]
    cfg = params.tune.model_copy(update={"sampler": sampler, "pruner": pruner, "multi_objective": False})
    url = f"sqlite:///{folder / f'{sampler}-{pruner}-{seed}.db'}"
    fam = params.families[family]
    study = tune.open_study(url, "bench", cfg, fam, seed)
    objective = tune.objective(recipe(params.families, params.train, family), fam, splits, params.train, cfg,
                               params.evaluate, seed)
    t0 = time.perf_counter()
    with tune.torch_threads(cfg.threads_per_trial):
        tune.run_trials(study, objective, trials, None)
    wall = time.perf_counter() - t0
    return {"best": study.best_value, "wall": wall, **tune.counts(study)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=24, help="trials per arm and seed")
    ap.add_argument("--family", default="mlp", help="a family of params.yaml's families: that takes the data's rows")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    params = load_params(REPO / "params.yaml")
    if args.family not in params.families:
        ap.error(f"--family {args.family!r}: families are {sorted(params.families)}")
    folder = Path(tempfile.mkdtemp(prefix="ottimo-bench-tune-"))
    try:
        materialise_raw(folder, params.data)
        prepare(folder, params.data, folder / "prepared")
        splits = load_splits(folder / "prepared")
        budget = params.families[args.family].trial_epochs
        print(f"{params.data.builtin or params.data.path}: {len(splits.y_train)} train / {len(splits.y_val)} val rows;"
              f" {args.family}, {args.trials} trials per arm, budget {budget} epochs per trial "
              f"(patience {params.train.patience}), hyperband min {params.tune.min_epochs} reduction "
              f"{params.tune.reduction_factor}, TPE start-up {params.tune.startup_trials}; {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.2f}")
        print(f"{'seed':>4}  {'arm':<19} {'best val acc':>12} {'epochs':>7} {'wall s':>7} "
              f"{'complete':>8} {'pruned':>6} {'failed':>6}")
        results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for i in range(args.seeds):
            seed = params.project.seed + i
            for arm in (list(ARMS) if i % 2 == 0 else list(reversed(ARMS))):
                r = run_arm(folder, params, splits, args.family, arm, args.trials, seed)
                results[arm].append(r)
                print(f"{seed:>4}  {arm:<19} {r['best']:>12.4f} {r['epochs']:>7d} {r['wall']:>7.1f} "
                      f"{r['complete']:>8d} {r['pruned']:>6d} {r['failed']:>6d}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    mean = {arm: {k: statistics.mean(r[k] for r in rs) for k in ("best", "epochs", "wall")}
            for arm, rs in results.items()}
    for arm, m in mean.items():
        print(f"{'mean':>4}  {arm:<19} {m['best']:>12.4f} {m['epochs']:>7.1f} {m['wall']:>7.1f}")
    hb, rnd = mean["tpe+hyperband"], mean["random, no pruning"]
    gap = (rnd["best"] - hb["best"]) * 100
    share, wall = hb["epochs"] / rnd["epochs"], hb["wall"] / rnd["wall"]
    per_seed = [f"{(r['best'] - h['best']) * 100:+.2f}/{h['epochs'] / r['epochs']:.2f}"
                for h, r in zip(results["tpe+hyperband"], results["random, no pruning"], strict=True)]
    print(f"per seed, points short of random / epoch share: {', '.join(per_seed)}")
    print(f"tpe+hyperband / random: best val accuracy {hb['best']:.4f} vs {rnd['best']:.4f}, {gap:+.2f} points short "
          f"of random (goal <= {MAX_DROP_POINTS}); epochs {share:.2f}x (goal <= {MAX_EPOCH_SHARE:.2f}); "
          f"wall time {wall:.2f}x")
    met = gap <= MAX_DROP_POINTS and share <= MAX_EPOCH_SHARE
    print(f"load average now {os.getloadavg()[0]:.2f}; goal {'MET' if met else 'NOT MET'}")


if __name__ == "__main__":
    main()
