"""Fault injection for tests only: die hard at a named stage boundary, as a SIGKILL or power cut would.

Set OTTIMO_CRASH_AT=<name> (or <name>@<n> for the n-th time the process passes that point) and the process
exits at once with code 77 via os._exit: no finally blocks, no Prefect or MLflow cleanup hooks, no flushed
buffers. Unset, a checkpoint costs one environment lookup. Never set it in production.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

ENV = "OTTIMO_CRASH_AT"
EXIT_CODE = 77

# The training pipeline's crash points (tests/system/test_crash.py parametrises over them).
POINTS = ("after-prepare", "mid-tuning", "after-training", "mid-compression", "after-registering",
          "between-alias-moves")
# The production loop's points (tests/system/test_crash_loop.py; before-rollback-tags: tests/flows/
# test_loop_hardening.py): hit by `ottimo score`, `ottimo drift-check` and a rollback.
LOOP_POINTS = ("mid-scoring", "mid-drift-check", "after-appending-rows", "after-retrain", "before-rollback-tags")

_passed: Counter[str] = Counter()


def checkpoint(name: str) -> None:
    """Exit the process hard (code 77) when OTTIMO_CRASH_AT names this point (and its hit count, if given)."""
    target = os.environ.get(ENV)
    if not target:
        return
    point, _, nth = target.partition("@")
    if point != name:
        return
    _passed[name] += 1
    if _passed[name] >= int(nth or 1):
        sys.stderr.write(f"{ENV}={target}: crashing at {name}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
