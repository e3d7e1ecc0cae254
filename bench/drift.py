"""How well and how fast the drift check decides: false alarms, detection, and cost by window size.

On scikit-learn's digits (64 pixel features): a reference of `--reference` rows (the size of the project's
reference split) and windows of `--window` rows drawn from the other rows, both seeded per window:
  - false-alarm rate: share of `--windows` no-drift windows that Evidently flags as data drift (goal <= 5%);
  - detection rate: share of `--windows` windows with a moderate covariate shift flagged (goal >= 95%);
    the shift: every pixel brighter by 0.5 of its standard deviation (`ottimo.monitor.simulate`, kind shift,
    severity 0.5); blank border pixels stay blank;
  - the time of one check (ottimo.monitor.drift.detect, with the HTML preset and without) and the memory it allocates
    (tracemalloc peak) at 1k, 10k, 100k and 1M window rows (digits resampled with replacement; the reference
    grows with it): both sides are sampled down to drift.max_rows, so time and memory stop growing above it.
The decision uses the thresholds in params.yaml (`drift:`), as the flow does. The rate loops compute the
drifted-columns count without the per-column plots (same stat tests and thresholds, ~15x faster).

    .venv/bin/python bench/drift.py                       # 50 + 50 windows, sizes 1k..1M
    .venv/bin/python bench/drift.py --windows 10 --sizes 1000 10000   # quick
    .venv/bin/python bench/drift.py --windows 0                       # timing only
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ottimo.config import load_params  # noqa: E402
from ottimo.data.tables import builtin_frame  # noqa: E402
from ottimo.monitor import simulate  # noqa: E402
from ottimo.monitor.drift import PREDICTION, detect  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEVERITY = 0.5  # the moderate covariate shift: every pixel + 0.5 std


def frame(df: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """Features plus a prediction column (here the true label: the check's prediction-drift input)."""
    out = df[features].copy()
    out[PREDICTION] = df["target"].to_numpy()
    return out


def rates(df, features, cfg, windows: int, window: int, reference: int, seed: int,
          severity: float = SEVERITY) -> tuple[float, float, float]:
    flagged = {"none": 0, "shift": 0}
    shares = []
    for i in range(windows):
        ref = df.sample(n=reference, random_state=seed + 10_000 + i)
        pool = df.drop(ref.index)
        for kind, sev in (("none", 0.0), ("shift", severity)):
            cur = pool.sample(n=window, random_state=seed + i)
            cur = simulate.shift(cur, features, "target", kind, sev, seed + i)
            found, _ = detect(frame(ref, features), frame(cur, features), features, cfg, full=False)
            flagged[kind] += bool(found["dataset_drift"])
            if kind == "shift":
                shares.append(found["drift_share"])
    return flagged["none"] / windows, flagged["shift"] / windows, float(np.median(shares))


def timing(df, features, cfg, sizes: list[int], seed: int) -> list[tuple[int, float, float, float, float]]:
    """Seconds of one check without and with the HTML preset, the window's own size in memory, and the peak
    memory the check allocates on top of its inputs (tracemalloc, in a separate untimed call)."""
    rows = []
    detect(frame(df, features), frame(df, features), features, cfg, full=True)  # imports and caches: untimed
    for n in sizes:
        ref = frame(df.sample(n=n, replace=True, random_state=seed + 1), features)
        cur = frame(df.sample(n=n, replace=True, random_state=seed), features)
        t0 = time.perf_counter()
        detect(ref, cur, features, cfg, full=False)
        fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        detect(ref, cur, features, cfg, full=True)
        full = time.perf_counter() - t0
        tracemalloc.start()
        detect(ref, cur, features, cfg, full=False)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        rows.append((n, fast, full, cur.memory_usage(deep=True).sum() / 2**20, peak))
        del ref, cur
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=str(REPO / "params.yaml"))
    p.add_argument("--windows", type=int, default=50)
    p.add_argument("--window", type=int, default=200, help="rows per window")
    p.add_argument("--reference", type=int, default=180, help="reference rows (digits' 10%% reference split)")
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000, 10_000, 100_000, 1_000_000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--severity", type=float, default=SEVERITY, help="shift in std units (default: the moderate one)")
    args = p.parse_args()
    cfg = load_params(args.params).drift
    df = builtin_frame("digits")
    features = [c for c in df.columns if c != "target"]
    print(f"drift: drift_share {cfg.drift_share}, method {cfg.method or 'auto'}, threshold {cfg.threshold or 'default'}"
          f", max_rows {cfg.max_rows}; {args.windows} windows of {args.window} rows vs {args.reference} reference")
    if args.windows:
        t0 = time.perf_counter()
        far, det, share = rates(df, features, cfg, args.windows, args.window, args.reference, args.seed,
                                 args.severity)
        print(f"false-alarm rate (no drift)       {far:6.1%}   goal <= 5%   {'ok' if far <= 0.05 else 'MISSED'}")
        label = f"detection rate (shift {args.severity:g} std)"
        print(f"{label:<34}{det:6.1%}   goal >= 95%  {'ok' if det >= 0.95 else 'MISSED'}"
              f"   (median drifted share {share:.2f}; {time.perf_counter() - t0:.0f} s)")
    print("\n| window rows | rows Evidently sees | check, count only (s) | check with HTML preset (s) "
          "| window in memory (MB) | check's peak allocation (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, fast, full, size, peak in timing(df, features, cfg, args.sizes, args.seed):
        print(f"| {n:,} | {min(n, cfg.max_rows):,} | {fast:.2f} | {full:.2f} | {size:.0f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
