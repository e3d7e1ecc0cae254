"""One alias move in its own process, for tests: `python -m tests.alias_worker PROJECT OP VERSION EXPECTED DIR`.

OP is `promote` (VERSION -> champion) or `rollback`; EXPECTED is the champion the decision was taken on. It
connects, writes DIR/ready-<pid>, waits for DIR/go, then moves. Prints the outcome; exit 0: done, 1: refused.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ottimo.config import load_params
from ottimo.registry import promotion, versions
from ottimo.registry.tracking import connect


def main(project: str, op: str, version: str, expected: str, barrier: str) -> int:
    root = Path(project)
    params = load_params(root / "params.yaml")
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    versions.aliases(client, name)  # the store is open before the race starts
    (Path(barrier) / f"ready-{os.getpid()}").touch()
    while not (Path(barrier) / "go").exists():
        time.sleep(0.01)
    try:
        if op == "promote":
            after = promotion.promote(client, name, version, expected)
        else:
            after = promotion.rollback(client, name, f"test {os.getpid()}", expected, f"worker {os.getpid()}")
    except (promotion.PromotionError, promotion.NoPreviousChampion) as err:
        print(f"REFUSED {op}: {err}")
        return 1
    print(f"DONE {op}: {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
