"""One Optuna worker process on a shared study: `python optuna_worker.py URL STUDY SHARE N SLEEP HEARTBEAT GRACE
HANG_AT`. Runs its share of N cheap trials through ottimo.models.tune.run_trials (no torch training: the test is
about the storage). HANG_AT >= 0: at that trial of its own it prints `HANG <number>` and sleeps until killed."""

from __future__ import annotations

import os
import sys
import time

from ottimo.config import Params, TuneCfg
from ottimo.models import tune


def main(url: str, name: str, share: str, n: int, sleep: float, heartbeat: int, grace: int, hang_at: int) -> None:
    cfg = TuneCfg(sampler="random", pruner="none", heartbeat_seconds=heartbeat or None, grace_seconds=grace or None)
    study = tune.open_study(url, name, cfg, Params().families["mlp"], 0, worker=os.getpid())
    started = []

    def objective(trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        trial.set_user_attr("pid", os.getpid())
        started.append(trial.number)
        if len(started) - 1 == hang_at:
            print(f"HANG {trial.number}", flush=True)
            time.sleep(3600)
        for step in range(3):  # a few writes per trial, like epochs
            time.sleep(sleep / 3)
            trial.report(x * step, step)
        return x

    ran = tune.run_trials(study, objective, n, time.time() + 300, share=share)
    print("RAN", " ".join(map(str, ran)), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), float(a[4]), int(a[5]), int(a[6]), int(a[7]))
