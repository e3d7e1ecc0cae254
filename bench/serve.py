"""`ottimo serve` under load, on 127.0.0.1 only, bounded in requests and time.

1. Latency p50/p99 and throughput of POST /predict (one row) at 1, 8 and 32 concurrent clients, against the same
   ONNX session called in-process (the ratio is the server's cost: HTTP, JSON, checks, traffic log).
2. Swaps under load: 8 clients keep posting while promotion and rollback alternate `--swaps` times: non-2xx
   answers, p99 during swaps vs steady state, and the time from each alias move to the first answer by the new
   version (goal <= 5 s with the default poll interval).

Without --project-dir it builds a temporary project (DVC-prepared digits, two registered linear ONNX versions:
tests/helpers/loop_helpers.py); with one, that project's champion and previous-champion are used.

    .venv/bin/python bench/serve.py                    # ~2 min
    .venv/bin/python bench/serve.py --seconds 3 --swaps 6
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
                  PYTHONPATH=str(REPO))

from ottimo.config import load_params  # noqa: E402
from ottimo.data import batches  # noqa: E402
from ottimo.onnx.export import INPUT, OUTPUT  # noqa: E402
from ottimo.registry import promotion, versions  # noqa: E402
from ottimo.registry.security import fetch_verified, serving_session  # noqa: E402
from ottimo.registry.tracking import connect  # noqa: E402
from ottimo.serving.client import Client, Load  # noqa: E402

MAX_REQUESTS = 20_000  # per client and phase: the bound besides --seconds


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project(args, tmp: Path) -> Path:
    if args.project_dir:
        return Path(args.project_dir).resolve()
    from tests.helpers.loop_helpers import loop_project

    root, *_ = loop_project(tmp / "project", versions=2)
    return root


def start(root: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "ottimo.cli", "serve", "-C", str(root), "--port", str(port)],
                            cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if Client("127.0.0.1", port).call("GET", "/health")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"ottimo serve did not come up; see {log}")


def in_process(root: Path, params, X: np.ndarray, seconds: float) -> tuple[float, float, float]:
    """p50, p99 (ms) and rows/s of the champion's session called directly with one row, 1 thread."""
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    path, mv = fetch_verified(client, name, versions.CHAMPION, root / "mlruns" / "work" / "bench-serve")
    sess = serving_session(path, mv.tags["sha256"], params.deploy.serve.threads)
    times, t_end, i = [], time.perf_counter() + seconds, 0
    while time.perf_counter() < t_end and i < MAX_REQUESTS * 10:
        row = X[i % len(X)][None, :]
        t0 = time.perf_counter()
        sess.run([OUTPUT], {INPUT: row})
        times.append(time.perf_counter() - t0)
        i += 1
    ms = np.array(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(ms) / ms.sum() * 1e3


def stats(answers, t0: float | None = None, t1: float | None = None) -> tuple[float, float, float, int]:
    picked = [a for a in answers if (t0 is None or a.t >= t0) and (t1 is None or a.t <= t1)]
    ms = np.array([a.ms for a in picked])
    span = (max(a.t for a in picked) - min(a.t for a in picked)) if len(picked) > 1 else 1.0
    return (float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(picked) / max(span, 1e-9),
            sum(1 for a in picked if not 200 <= a.status < 300))


def swaps(root: Path, params, port: int, rows: list, n: int, settle: float) -> dict:
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    load = Load("127.0.0.1", port, rows, clients=8, max_requests=MAX_REQUESTS * 5).start()
    time.sleep(settle)
    steady_end = time.monotonic()
    delays = []
    for i in range(n):
        now = versions.aliases(client, name)
        champion, previous = now[versions.CHAMPION], now[versions.PREVIOUS]
        moved = time.monotonic()
        if i % 2 == 0:
            promotion.promote(client, name, previous, champion)  # the other version, by promotion
        else:
            promotion.rollback(client, name, "bench/serve.py swap", champion)  # and back, by rollback
        deadline = moved + 30
        while time.monotonic() < deadline:
            first = [a.t for a in load.answers[-400:] if a.version == previous and a.t > moved]
            if first:
                delays.append(min(first) - moved)
                break
            time.sleep(0.02)
        else:
            delays.append(float("inf"))
        time.sleep(settle / 4)
    swaps_end = time.monotonic()
    load.stop()
    t_start = min(a.t for a in load.answers)
    return {"steady": stats(load.answers, t_start + 0.5, steady_end), "swaps": stats(load.answers, steady_end,
            swaps_end), "delays": delays, "errors": load.errors, "total": len(load.answers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project-dir", help="a project with champion and previous-champion (default: a temporary one)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per load level (bounded by requests too)")
    ap.add_argument("--swaps", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = project(args, Path(tmp))
        params = load_params(root / "params.yaml")
        schema = batches.schema_of(root / "data" / "prepared")
        test = pd.read_parquet(root / "data" / "prepared" / "test.parquet")
        X = test[schema["features"]].to_numpy(dtype="float32")
        rows = [dict(zip(schema["features"], map(float, X[0]), strict=True))]
        port, log = free_port(), Path(tmp) / "serve.log"
        proc = start(root, port, log)
        try:
            p50, p99, rps = in_process(root, params, X, args.seconds)
            print(f"in-process onnxruntime, 1 row: p50 {p50:.3f} ms  p99 {p99:.3f} ms  {rps:,.0f} calls/s")
            print(f"{'clients':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'non-2xx':>8} {'x p50 in-proc':>14}")
            for clients in (1, 8, 32):
                load = Load("127.0.0.1", port, rows, clients=clients, max_requests=MAX_REQUESTS).run_for(args.seconds)
                s50, s99, srps, bad = stats(load.answers)
                print(f"{clients:>8} {s50:>8.2f} {s99:>8.2f} {srps:>8,.0f} {bad:>8} {s50 / p50:>13,.0f}x")
            r = swaps(root, params, port, rows, args.swaps, settle=max(args.seconds / 2, 2.0))
            d = np.array(r["delays"])
            print(f"swaps under load (8 clients, {args.swaps} alternating promotions/rollbacks, "
                  f"poll {params.deploy.serve.poll_seconds:g} s): {r['total']:,} answers, "
                  f"{r['steady'][3] + r['swaps'][3]} non-2xx, {len(r['errors'])} connection errors")
            print(f"  p99 steady {r['steady'][1]:.2f} ms, during swaps {r['swaps'][1]:.2f} ms "
                  f"({r['swaps'][1] / r['steady'][1]:.2f}x; goal <= 1.5x)")
            print(f"  alias move -> first answer by the new version: median {np.median(d):.2f} s, "
                  f"max {d.max():.2f} s (goal <= 5 s)")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
