"""What the bad-input guards cost: ottimo.data.intake.preflight (streamed UTF-8 check, header check, line count)
against reading the same CSV with pandas, side by side on one synthetic file; and how fast a file far above
limits.max_file_mb is refused (a sparse file: no disk used, never read).

    .venv/bin/python bench/intake.py                 # 200,000 rows x 32 features (a 120 MB CSV)
    .venv/bin/python bench/intake.py --rows 20000    # quick check
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
from sklearn.datasets import make_classification

from ottimo.config import LimitsCfg
from ottimo.data.intake import DataValidationError, preflight


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        X, y = make_classification(args.rows, args.features, random_state=0)
        path = root / "data.csv"
        pd.DataFrame(X, columns=[f"f{i}" for i in range(args.features)]).assign(target=y).to_csv(path, index=False)
        limits = LimitsCfg()
        guard = timed(lambda: preflight(root, path, limits), args.repeat)
        read = timed(lambda: pd.read_csv(path), args.repeat)
        mb = path.stat().st_size / 2**20
        print(f"{args.rows:,} rows x {args.features} features, {mb:.1f} MB CSV, median of {args.repeat}:")
        print(f"  preflight {guard * 1e3:8.1f} ms   pandas.read_csv {read * 1e3:8.1f} ms   "
              f"guard / read = {guard / read:.2f}")

        huge = root / "huge.csv"
        with open(huge, "wb") as f:
            f.truncate(10 << 30)
        start = time.perf_counter()
        try:
            preflight(root, huge, limits)
        except DataValidationError as err:
            refused = time.perf_counter() - start
            print(f"  10 GiB file refused in {refused * 1e3:.2f} ms: {str(err).split(': ', 1)[1][:70]}...")


if __name__ == "__main__":
    main()
