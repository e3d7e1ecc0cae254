"""What orchestration costs: the training pipeline as a user runs it against the same core steps in a plain script.

Each round runs pairs, one run right after the other, each in a fresh subprocess and a fresh temporary project
(params.yaml and dvc.yaml copied from the repo root; tuning and compression off, bench/tuning.py and
bench/compression.py measure those):
  ephemeral: `ottimo run` on the embedded defaults: Prefect's temporary API server, MLflow on SQLite in the
             project, DVC with a local remote;
  server:    `ottimo run` with a Prefect server and an MLflow server already running (started once, as `make up`
             runs them; each run gets its own experiment and registered model);
  plain:     `plain_pipeline` below: the same ottimo functions on the same data, no Prefect, MLflow or DVC; one
             plain run beside every flow run.
Both candidates are trained one after the other and both model cards are computed in every run. Times are
wall-clock from the parent (time.perf_counter, Python start-up and exit included); cpu is the user+system time
of the run's process tree (its own children, such as the temporary server, included; the shared servers not).
Goals: median flow/plain <= 1.10 with servers running, <= 1.25 on the ephemeral API. The fixed cost is flow minus
plain, in seconds; where it goes is measured stage by stage: the flow's stages end where Prefect logs each task
run's end, the plain script's where it prints its phase times. Prefect's databases live in temporary
PREFECT_HOMEs, created by an untimed trivial flow first (a once-per-machine cost, not a per-run one).

    .venv/bin/python bench/overhead.py --rounds 3                   # both modes, interleaved
    .venv/bin/python bench/overhead.py --rounds 3 --mode server     # one mode
    .venv/bin/python bench/overhead.py --rounds 1 --max-epochs 3    # quick check
    .venv/bin/python bench/overhead.py --rounds 3 --threads 1       # torch on one thread in both arms

On a shared machine, torch's threads spinning against other work make the training stage swing several-fold
from one run to the next, in either arm; --threads 1 (OMP_NUM_THREADS in both arms) steadies it. The fixed cost
does not depend on it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from ottimo.ops.postgres import free_port

REPO = Path(__file__).resolve().parent.parent
GOALS = {"ephemeral": 1.25, "server": 1.10}
FLOW = ["-m", "ottimo.cli", "run", "-C"]  # + project folder: `ottimo run`, what `make run` runs
WARMUP = "from prefect import flow; flow(name='bench-warmup')(lambda: None)()"
# stage -> the tasks whose runs end in it (a stage of the flow runs from the end of the task before to its own end,
# so Prefect's bookkeeping between tasks counts in the next stage); "start" ends where the flow run begins,
# "finish" is from the last task's end to the exit
STAGES = {
    "start": (),
    "reconcile": ("reconcile",),
    "data": ("validate_raw", "prepare_data", "check_candidates", "push_data"),
    "run key": ("start_pipeline_run", "check_novelty"),  # the pipeline's MLflow run; anything new to train?
    "train": ("train_candidate",),
    "export": ("export_candidate",),
    "evaluate": ("evaluate_candidate", "evaluate_champion"),
    "register+card+gate": ("register_candidate", "model_card", "gate", "promote_selected", "summarise"),
    "finish": (),
}
STAGE_OF = {name: stage for stage, names in STAGES.items() for name in names}
PREFECT_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+ +\| (?:Task run '([a-z_]+)[^']*' - Finished in state"
                          r"|Flow run '[^']+' - (Beginning) flow run)")


def plain_pipeline(root: Path, phases: list[tuple[str, float]]) -> dict:
    """validate → prepare → train each candidate → ONNX export + parity + sha256 → measure → card → gate.
    Appends (stage, time.time()) at the end of each phase to `phases`, stages named as the flow's (STAGES)."""
    from ottimo.card.sections import measure_card
    from ottimo.config import load_params
    from ottimo.data.tables import load_splits, materialise_raw, prepare, read_table, validate_frame
    from ottimo.models.family import recipe
    from ottimo.models.train import fit
    from ottimo.onnx.export import export_onnx, parity_check, sha256
    from ottimo.onnx.measure import confusion_png, measure
    from ottimo.registry.gate import GateFailed, check, select

    def done(stage: str) -> None:
        phases.append((stage, time.time()))

    done("start")
    params = load_params(root / "params.yaml")
    raw = materialise_raw(root, params.data)
    validate_frame(read_table(raw), params.data, raw)
    prepared = root / "data" / "prepared"
    prepare(root, params.data, prepared)
    splits = load_splits(prepared)
    done("data")
    results = {}
    for family in params.train.candidates:
        model = fit(recipe(params.families, params.train, family), splits, params.train, params.project.seed).model
        done("train")
        path = export_onnx(model, splits.input, root / f"{family}.onnx")
        parity_check(model, path, splits.X_test, params.evaluate.parity_atol)
        digest = sha256(path)
        done("export")
        metrics, pred = measure(path, splits.X_test, splits.y_test, params.evaluate)
        confusion_png(splits.y_test, pred, splits.labels, root / f"{family}.png", family)
        done("evaluate")
        measure_card(path, splits, params.card, params.evaluate, params.gate.max_p95_latency_ms, root / family)
        results[family] = ({**metrics.as_dict(), "sha256": digest}, check(metrics.as_dict(), params.gate, None))
        done("register+card+gate")
    chosen = select(results)
    if not results[chosen][1].passed:  # the flow's gate raises too
        raise GateFailed(f"best was {chosen}: {results[chosen][1].summary}")
    done("register+card+gate")
    return {"selected": chosen, **{f: v.summary for f, (_, v) in results.items()}}


def flow_phases(output: str, started: float) -> list[tuple[str, float]]:
    """(stage, time) at the start of the flow run and at the end of each task run, from Prefect's console log
    (its clock is this machine's local time of day)."""
    day = dt.datetime.fromtimestamp(started).date()
    phases = []
    for line in output.splitlines():
        if m := PREFECT_LINE.match(line):
            t = dt.datetime.combine(day, dt.time.fromisoformat(m.group(1))).timestamp()
            phases.append(("start" if m.group(3) else STAGE_OF.get(m.group(2), "register+card+gate"),
                           t + (86400 if t < started - 60 else 0)))
    return phases


def stage_seconds(phases: list[tuple[str, float]], started: float, ended: float) -> dict[str, float]:
    """Seconds per stage: each phase runs from the end of the one before (the process start first); the rest, to
    the process exit, is `finish`."""
    out = dict.fromkeys(STAGES, 0.0)
    last = started
    for stage, t in phases:
        out[stage] += t - last
        last = t
    out["finish"] += ended - last
    return out


def child_env(prefect_home: str, threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OTTIMO_TRACKING_URI",
                                                             "PREFECT_API_URL")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                  "DO_NOT_TRACK": "1", "PREFECT_HOME": prefect_home, "COLUMNS": "200",
                  "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}  # default 20 s fails on a busy machine


def new_project(max_epochs: int | None, mlflow_names: str | None = None) -> Path:
    root = Path(tempfile.mkdtemp(prefix="ottimo-bench-"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.setdefault("tune", {})["enabled"] = False  # the plain script does not tune; bench/tuning.py measures that
    params.setdefault("compress", {})["enabled"] = False  # nor compress (on in params.yaml): bench/compression.py
    if max_epochs is not None:
        params["train"]["max_epochs"] = max_epochs
    if mlflow_names:  # a shared MLflow server: this run's own experiment and model, so no champion is found
        params["mlflow"] |= {"experiment": mlflow_names, "registered_model": mlflow_names}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, float, float, str, str]:
    """Run `python ARGS`; (wall s, cpu s of its process tree, start and end as time.time(), stdout, stderr)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started, t0 = time.time(), time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds, ended = time.perf_counter() - t0, time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:4])} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return seconds, cpu, started, ended, proc.stdout, proc.stderr


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str], health: str):
    """A server process for the whole benchmark, up when `health` answers."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(360):
            try:
                urllib.request.urlopen(health, timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    sys.exit(f"{argv[:3]} exited with {proc.returncode}")
                time.sleep(0.5)
        else:
            sys.exit(f"{argv[:3]} did not answer within 180 s")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def servers(env: dict[str, str], workdir: Path):
    """A Prefect server and an MLflow server (SQLite and served artifacts under `workdir`) on 127.0.0.1, started
    the way `make up` starts them; yields the environment that points a run at them."""
    bin_dir = Path(sys.executable).parent
    prefect_port, mlflow_port = free_port(), free_port()
    prefect = [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow = [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
              "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--serve-artifacts",
              "--artifacts-destination", str(workdir / "artifacts"),
              "--allowed-hosts", f"127.0.0.1:{mlflow_port},localhost:{mlflow_port}"]
    with started(prefect, env, f"http://127.0.0.1:{prefect_port}/api/health"), \
            started(mlflow, env, f"http://127.0.0.1:{mlflow_port}/health"):
        urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1",
                               timeout=30)  # its first request imports the store: not a per-run cost
        yield env | {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                     "OTTIMO_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """median (min–max)"""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-epochs", type=int, default=None, help="override train.max_epochs")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both arms (default: as set)")
    ap.add_argument("--mode", choices=["both", "ephemeral", "server"], default="both")
    ap.add_argument("--server", action="store_true", help="same as --mode server")
    ap.add_argument("--plain", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        phases: list[tuple[str, float]] = []
        result = plain_pipeline(args.plain.resolve(), phases)
        print(json.dumps({"result": result, "phases": phases}))
        return

    modes = ["server"] if args.server else ["ephemeral", "server"] if args.mode == "both" else [args.mode]
    epochs = args.max_epochs or yaml.safe_load((REPO / "params.yaml").read_text())["train"]["max_epochs"]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with contextlib.ExitStack() as stack:
        envs = {}
        for mode in modes:
            home = Path(tempfile.mkdtemp(prefix=f"ottimo-bench-{mode}-"))
            stack.callback(shutil.rmtree, home, ignore_errors=True)
            env = child_env(str(home / "prefect"), args.threads)
            if mode == "server":
                t0 = time.perf_counter()
                env = stack.enter_context(servers(env, home))
                print(f"prefect and mlflow servers up in {time.perf_counter() - t0:.1f} s (not counted)")
            print(f"prefect warm-up, {mode} (not counted): {timed(['-c', WARMUP], REPO, env)[0]:.1f} s")
            envs[mode] = env
        print(f"{args.rounds} round(s), max_epochs {epochs}, {os.cpu_count()} CPUs, threads "
              f"{args.threads or os.environ.get('OMP_NUM_THREADS', 'torch default')}, load {os.getloadavg()[0]:.2f}")
        print(f"{'mode':<10} {'round':>5} {'flow s':>7} {'plain s':>7} {'ratio':>6} {'fixed s':>7} "
              f"{'flow cpu':>8} {'plain cpu':>9} {'cpu ratio':>9}")
        for i in range(1, args.rounds + 1):
            for mode in modes:
                run: dict = {}
                for arm in ("flow", "plain"):
                    names = f"bench-{os.getpid()}-{i}" if mode == "server" else None
                    root = new_project(args.max_epochs, names)
                    try:
                        cmd = [*FLOW, str(root)] if arm == "flow" else [str(Path(__file__).resolve()), "--plain",
                                                                        str(root)]
                        wall, cpu, t_start, t_end, out, err = timed(cmd, root, envs[mode])
                    finally:
                        shutil.rmtree(root, ignore_errors=True)
                    if arm == "flow":
                        phases = flow_phases(out + err, t_start)
                    else:
                        phases = [tuple(p) for p in json.loads(out.strip().splitlines()[-1])["phases"]]
                    run[arm] = {"wall": wall, "cpu": cpu, "stages": stage_seconds(phases, t_start, t_end)}
                runs[mode].append(run)
                f, p = run["flow"], run["plain"]
                print(f"{mode:<10} {i:>5} {f['wall']:>7.1f} {p['wall']:>7.1f} {f['wall'] / p['wall']:>6.2f} "
                      f"{f['wall'] - p['wall']:>7.1f} {f['cpu']:>8.1f} {p['cpu']:>9.1f} {f['cpu'] / p['cpu']:>9.2f}",
                      flush=True)
    print(f"load average now {os.getloadavg()[0]:.2f} (other work on these CPUs skews both arms)\n")
    for mode in modes:
        rs = runs[mode]
        ratios = [r["flow"]["wall"] / r["plain"]["wall"] for r in rs]
        fixed = [r["flow"]["wall"] - r["plain"]["wall"] for r in rs]
        ratio = statistics.median(ratios)
        print(f"{mode}: flow/plain {spread(ratios)}, fixed cost {spread(fixed, '{:+.1f}')} s, cpu flow/plain "
              f"{spread([r['flow']['cpu'] / r['plain']['cpu'] for r in rs])}; goal <= {GOALS[mode]:.2f}: "
              f"{'MET' if ratio <= GOALS[mode] else f'NOT MET (by {ratio - GOALS[mode]:.2f})'}")
        print(f"  {'stage':<20} {'flow s':>7} {'plain s':>7} {'fixed s':>7}   (medians over rounds)")
        for stage in STAGES:
            fs, ps = ([r[arm]["stages"][stage] for r in rs] for arm in ("flow", "plain"))
            print(f"  {stage:<20} {statistics.median(fs):>7.2f} {statistics.median(ps):>7.2f} "
                  f"{statistics.median([a - b for a, b in zip(fs, ps, strict=True)]):>+7.2f}")


if __name__ == "__main__":
    main()
