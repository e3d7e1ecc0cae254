"""What orchestration costs: the Prefect training flow against the same core steps in a plain script.

Each round runs, in this order and each in a fresh subprocess and a fresh temporary project (params.yaml
and dvc.yaml copied from the repo root):
  (a) flow:  flows.pipeline.training_pipeline, with Prefect (ephemeral API), MLflow logging and DVC;
  (b) plain: `plain_pipeline` below, the same ottimo functions on the same data, no Prefect, MLflow or DVC.
Both are timed from the parent with time.perf_counter, Python start-up included. The goal is a median
ratio flow/plain <= 1.10. Prefect's database lives in a temporary PREFECT_HOME shared by all rounds and is
created by an untimed trivial flow first (a once-per-machine cost, not a per-run one). Both train the
candidates one after the other and both compute every candidate's model card.

    .venv/bin/python bench/overhead.py --rounds 3
    .venv/bin/python bench/overhead.py --rounds 3 --server   # flows on a running Prefect server, as in production
    .venv/bin/python bench/overhead.py --rounds 1 --max-epochs 3    # quick check
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GOAL = 1.10
FLOW = ("import sys; from flows.pipeline import training_pipeline; "
        "training_pipeline(project_dir=sys.argv[1], params_file='params.yaml')")
WARMUP = "from prefect import flow; flow(name='bench-warmup')(lambda: None)()"


def plain_pipeline(root: Path) -> dict:
    """validate → prepare → train each candidate → ONNX export + parity + sha256 → measure → card → gate."""
    from ottimo.card.sections import measure_card
    from ottimo.config import load_params
    from ottimo.data.tables import load_splits, materialise_raw, prepare, read_table, validate_frame
    from ottimo.models.family import recipe
    from ottimo.models.train import fit
    from ottimo.onnx.export import export_onnx, parity_check, sha256
    from ottimo.onnx.measure import confusion_png, measure
    from ottimo.registry.gate import GateFailed, check, select

    params = load_params(root / "params.yaml")
    raw = materialise_raw(root, params.data)
    validate_frame(read_table(raw), params.data, raw)
    prepared = root / "data" / "prepared"
    prepare(root, params.data, prepared)
    splits = load_splits(prepared)
    results = {}
    for family in params.train.candidates:
        model = fit(recipe(params.families, params.train, family), splits, params.train, params.project.seed).model
        path = export_onnx(model, splits.input, root / f"{family}.onnx")
        parity_check(model, path, splits.X_test, params.evaluate.parity_atol)
        digest = sha256(path)
        metrics, pred = measure(path, splits.X_test, splits.y_test, params.evaluate)
        confusion_png(splits.y_test, pred, splits.labels, root / f"{family}.png", family)
        measure_card(path, splits, params.card, params.evaluate, params.gate.max_p95_latency_ms, root / family)
        results[family] = ({**metrics.as_dict(), "sha256": digest}, check(metrics.as_dict(), params.gate, None))
    chosen = select(results)
    if not results[chosen][1].passed:  # the flow's gate raises too
        raise GateFailed(f"best was {chosen}: {results[chosen][1].summary}")
    return {"selected": chosen, **{f: v.summary for f, (_, v) in results.items()}}


def child_env(prefect_home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                  "DO_NOT_TRACK": "1", "PREFECT_HOME": prefect_home,
                  "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}  # default 20 s fails on a busy machine


def new_project(max_epochs: int | None) -> Path:
    root = Path(tempfile.mkdtemp(prefix="ottimo-bench-"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.setdefault("tune", {})["enabled"] = False  # the plain script does not tune; bench/tuning.py measures that
    params.setdefault("compress", {})["enabled"] = False  # nor compress (on in params.yaml): bench/compression.py
    if max_epochs is not None:
        params["train"]["max_epochs"] = max_epochs
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(args[:2])} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return seconds


@contextlib.contextmanager
def prefect_server(env: dict[str, str]):
    """A real `prefect server start` on 127.0.0.1 for the whole benchmark; yields its API URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            sys.exit("prefect server did not answer within 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-epochs", type=int, default=None, help="override train.max_epochs")
    ap.add_argument("--server", action="store_true", help="run the flows on a Prefect server started once")
    ap.add_argument("--plain", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        print(plain_pipeline(args.plain.resolve()))
        return

    prefect_home = tempfile.mkdtemp(prefix="ottimo-bench-prefect-")
    env = child_env(prefect_home)
    epochs = args.max_epochs or yaml.safe_load((REPO / "params.yaml").read_text())["train"]["max_epochs"]
    flows: list[float] = []
    plains: list[float] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, prefect_home, ignore_errors=True)
        if args.server:
            t0 = time.perf_counter()
            env["PREFECT_API_URL"] = stack.enter_context(prefect_server(env))
            print(f"prefect server {env['PREFECT_API_URL']} up in {time.perf_counter() - t0:.1f} s (not counted)")
        print(f"prefect warm-up (not counted): {timed(['-c', WARMUP], REPO, env):.1f} s")
        print(f"{args.rounds} round(s), max_epochs {epochs}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
        print(f"{'round':>5} {'flow s':>8} {'plain s':>8} {'ratio':>6}")
        for i in range(1, args.rounds + 1):
            for times, cmd in ((flows, ["-c", FLOW]), (plains, [str(Path(__file__).resolve()), "--plain"])):
                root = new_project(args.max_epochs)
                try:
                    times.append(timed([*cmd, str(root)], root, env))
                finally:
                    shutil.rmtree(root, ignore_errors=True)
            print(f"{i:>5} {flows[-1]:>8.1f} {plains[-1]:>8.1f} {flows[-1] / plains[-1]:>6.2f}", flush=True)
    flow_s, plain_s = statistics.median(flows), statistics.median(plains)
    ratio = flow_s / plain_s
    print(f"{'median':>5} {flow_s:>8.1f} {plain_s:>8.1f} {ratio:>6.2f}")
    print(f"{'min':>5} {min(flows):>8.1f} {min(plains):>8.1f} {min(flows) / min(plains):>6.2f}  (least disturbed)")
    print(f"load average now {os.getloadavg()[0]:.2f} (other work on these CPUs skews both columns)")
    print(f"overhead {flow_s - plain_s:+.1f} s; goal flow/plain <= {GOAL:.2f}: {'MET' if ratio <= GOAL else 'NOT MET'}")


if __name__ == "__main__":
    main()
