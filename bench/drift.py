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
  - the alert budget (`--replay N`, default 720: a month of hourly checks): the whole policy (`assess` + `decide`,
    unlabelled windows of `--replay-rows` rows) with a scikit-learn logistic regression as champion and another
    as previous-champion (real probabilities; the flow gets the same from the ONNX session) on N no-drift
    windows: false retrains and rollbacks (goal <= 1); a gradual shift (every pixel + 0.05 std more each window,
    kept integer intensities 0..16): windows until the first retrain; a silent accuracy collapse without labels
    (blur of 1 pixel, labels unchanged, the champion drops ~25 points): windows until the estimate alone
    alarms (goal <= 2).
    Evidently's per-column tests are the costly part (~1-2 s a window here; the estimate, the PCA check and the
    per-column impact take ~0.1 s): they run on every `--evidently-every`-th replay window (default 10) and
    their time is printed; `--evidently-every 1` runs them on all.
The decision uses the thresholds in params.yaml (`drift:`), as the flow does. The rate loops compute the
drifted-columns count without the per-column plots (same stat tests and thresholds, ~15x faster).

    .venv/bin/python bench/drift.py                       # 50 + 50 windows, sizes 1k..1M
    .venv/bin/python bench/drift.py --windows 10 --sizes 1000 10000   # quick
    .venv/bin/python bench/drift.py --windows 0                       # timing only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # small matrices: threads only thrash
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

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


def _models(df, features, seed: int):
    """Reference (10%), a champion and a previous-champion (logistic regressions on two halves of the training
    rows), and the pool the windows are drawn from."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    rest, ref = train_test_split(df, test_size=0.1, stratify=df.target, random_state=seed)
    train, pool = train_test_split(rest, test_size=0.4, stratify=rest.target, random_state=seed)
    a, b = train_test_split(train, test_size=0.5, stratify=train.target, random_state=seed)
    fit = lambda part: LogisticRegression(max_iter=3000).fit(part[features] / 16, part.target)  # noqa: E731
    return ref, fit(train), fit(a), pool


def replay(df, features, cfg, windows: int, rows: int, every: int, seed: int) -> None:
    """The alert budget on replayed windows: false alarms, gradual-shift delay, unlabelled collapse."""
    from ottimo.monitor.drift import NOTHING, assess, decide

    ref, champ, prev, pool = _models(df, features, seed)
    lab = lambda m: (lambda r: m.predict(r[features] / 16))  # noqa: E731
    prob = lambda m: (lambda r: m.predict_proba(r[features] / 16))  # noqa: E731
    args = (lab(champ), lab(prev), prob(champ), prob(prev))

    def one(cur, per_column=True):
        cur = cur.assign(target=np.nan)  # unlabelled: production rows
        ev = assess(ref, cur, len(cur), features, "target", cfg, *args, full=False, per_column=per_column).evidence
        return ev, decide(ev, cfg, True, False)

    t0, t_ev, n_ev, alarms = time.perf_counter(), 0.0, 0, {}
    for i in range(windows):
        cur = pool.sample(n=rows, random_state=seed + 100 + i)
        t1 = time.perf_counter()
        _, d = one(cur, per_column=every > 0 and i % every == 0)
        if every > 0 and i % every == 0:
            t_ev += time.perf_counter() - t1
            n_ev += 1
        if d.action != NOTHING:
            alarms[i] = f"{d.action}: {d.reasons[0][:110]}"
    dt = time.perf_counter() - t0
    print(f"\nalert budget: {windows} no-drift windows of {rows} unlabelled rows (Evidently on {n_ev}): "
          f"{len(alarms)} false retrain/rollback   goal <= 1   {'ok' if len(alarms) <= 1 else 'MISSED'}"
          f"   ({dt:.0f} s; a window with Evidently {t_ev / max(n_ev, 1):.2f} s, without "
          f"{(dt - t_ev) / max(windows - n_ev, 1):.2f} s)")
    for i, why in list(alarms.items())[:5]:
        print(f"  window {i}: {why}")
    for i in range(1, 61):  # gradual shift: severity 0.05 std more each window
        cur = simulate.shift(pool.sample(n=rows, random_state=seed + 5000 + i), features, "target", "shift",
                             0.05 * i, seed + i)
        cur[features] = cur[features].round().clip(0, 16)  # still pixel intensities (fractions alone look drifted)
        ev, d = one(cur)
        if d.action != NOTHING:
            truth = float((champ.predict(cur[features] / 16) == cur.target).mean())
            print(f"gradual shift (+0.05 std a window): detected at window {i} (severity {0.05 * i:.2f} std, true "
                  f"accuracy {truth:.3f}) by: {d.reasons[0][:100]}")
            break
    else:
        print("gradual shift: not detected in 60 windows   MISSED")
    for i in range(1, 4):  # silent collapse without labels
        cur = simulate.shift(pool.sample(n=rows, random_state=seed + 9000 + i), features, "target", "blur", 1.0,
                             seed + i, image_shape=[8, 8])
        ev, d = one(cur)
        truth = float((champ.predict(cur[features] / 16) == cur.target).mean())
        by_estimate = ev.estimated_accuracy is not None and ev.estimate_alarm is not None \
            and ev.estimated_accuracy < ev.estimate_alarm
        print(f"unlabelled collapse (blur 1 px) window {i}: true accuracy {truth:.3f} (reference "
              f"{ev.reference_accuracy:.3f}), estimate {ev.estimated_accuracy:.3f} [{ev.estimate_low:.3f}, "
              f"{ev.estimate_high:.3f}], alarm below {ev.estimate_alarm:.3f}: "
              f"{'DETECTED by the estimate' if by_estimate else 'not by the estimate'}; decision {d.action}")
        if by_estimate:
            print(f"  detected within {i} window(s)   goal <= 2   {'ok' if i <= 2 else 'MISSED'}")
            break


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
    p.add_argument("--replay", type=int, default=720, help="no-drift windows of the alert-budget replay (0: skip)")
    p.add_argument("--replay-rows", type=int, default=100, help="rows per replay window (>= drift.min_rows)")
    p.add_argument("--evidently-every", type=int, default=10, help="Evidently on every n-th replay window")
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
    if args.replay:
        replay(df, features, cfg, args.replay, args.replay_rows, args.evidently_every, args.seed)
    if not args.sizes:
        return
    print("\n| window rows | rows Evidently sees | check, count only (s) | check with HTML preset (s) "
          "| window in memory (MB) | check's peak allocation (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, fast, full, size, peak in timing(df, features, cfg, args.sizes, args.seed):
        print(f"| {n:,} | {min(n, cfg.max_rows):,} | {fast:.2f} | {full:.2f} | {size:.0f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
