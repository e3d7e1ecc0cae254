"""Scale-out on this machine, side by side in one run, printed as ratios. One function per part (`--part`).

**prefect** (bench/prefect_scale.py): flow runs per minute through a process work pool with 1 vs 2 Prefect workers.
**optuna** (bench/optuna_scale.py): 8 concurrent Optuna processes on one study, Postgres vs SQLite: trials per
minute, errors, lock errors, lost and duplicated trials.

**dask**: tuning trials per minute and compression variants per minute with 1 vs 2 Dask workers (one thread each).
Two throw-away clusters run side by side for the whole part (ottimo.ops.dask_cluster: a scheduler and one-thread
worker processes on loopback, as `make up` starts them): one with 1 worker, one with 2. Both arms run the same flows
with the same params, reaching their cluster by address through prefect-dask (`tune.runner: dask`,
`compress.runner: dask`), under one temporary Prefect API and one MLflow store; only the scheduler address differs.
Each repeat runs both workloads on both arms, the arm order alternating between repeats. Every trial does the same
work (the MLP's space is one point: `--width` units x 2 layers, `--epochs` epochs, no pruner); every variant too
(unstructured magnitude pruning of the same teacher at `--variants` sparsities, `--finetune` epochs each, and its
int8-dyn). Workers are warmed before anything is timed: imports, one ONNX export, the first MLflow and Optuna
connections, then one small flow run of each kind per cluster (a worker's first flow run of a kind pays ~5 s once).
Two timings per flow run: the fan-out (first start to last end of the trial / variant task runs, from the Prefect
API), the rate the goal is about; and the whole flow run, which adds what does not fan out (opening and closing the
study, Optuna's plots; measuring every candidate one after another in the flow's process, the report).
Printed per run: the count, both times and rates; then per workload and timing the median rate per arm and the
2-worker / 1-worker ratio (paired within a repeat) as median [min-max] over repeats, against the goal (>= 1.7x on
the fan-out).

    .venv/bin/python bench/scale.py --part dask                     # ~4.5 min on 2 quiet cores
    .venv/bin/python bench/scale.py --part dask --repeats 1 --trials 2 --epochs 1 --variants 2 --finetune 1 --width 64

The workload is sized so that training dominates each task (a trial ~2.4 s, a variant ~4.6 s on one quiet core):
two plain torch processes of the same training ran 1.93x one on this machine. It splits evenly over 2 workers: 8
trials in 2 shares, 8 equal pruning variants (4 each) and the teacher's int8-dyn (~1 s). An odd count would cap the
ratio whatever the workers do: 7 equal variants leave one worker a fourth while the other idles, at most 7/4 = 1.75x
before any overhead (the bench ran 7 until 2026-12-02). What the workers share besides the
CPUs is in the figures too: on the default stores the two workers' Optuna and MLflow writes take turns on SQLite,
and the Prefect API and the flow's process take CPU beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import flow

from ottimo.config import Params, PruneCfg
from tasks.compress import Built
from tasks.data import DataVersion

REPO = Path(__file__).resolve().parent.parent
GOAL = 1.7  # 2 workers / 1 worker, rate


# --- dask -------------------------------------------------------------------------------------------------------


def dask_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("dask")
    g.add_argument("--trials", type=int, default=8, help="tuning trials per flow run (2 shares: n_jobs 2)")
    g.add_argument("--epochs", type=int, default=12, help="epochs of every trial")
    g.add_argument("--variants", type=int, default=8, help="pruning variants per compression flow run (+ int8-dyn)")
    g.add_argument("--finetune", type=int, default=8, help="fine-tuning epochs of every variant")
    g.add_argument("--width", type=int, default=1024, help="units of each of the MLP's 2 hidden layers")


def dask_params(width: int, epochs: int, variants: int, finetune: int) -> dict:
    """params.yaml with the bench's workload: an MLP whose tuning space is one point, pruning variants only."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mlp = raw["families"]["mlp"]
    mlp["hparams"] = {"hidden": [width, width], "dropout": 0.1}
    mlp["space"] = {"width": [width], "depth": [2], "lr": None, "dropout": None, "weight_decay": None,
                    "batch_size": None}  # null drops a built-in space key: every trial trains the same model
    mlp["trial_epochs"] = epochs
    raw["train"] |= {"candidates": ["mlp"], "max_epochs": 4, "patience": 4}
    raw["tune"] |= {"enabled": True, "n_jobs": 2, "sampler": "random", "pruner": "none", "timeout_seconds": None,
                    "runner": "dask"}
    raw["evaluate"] |= {"warmup": 5, "runs": 30, "bootstrap": 200}
    raw["gate"] |= {"min_accuracy": 0.0, "max_p95_latency_ms": 1000.0, "max_size_mb": 1000.0}
    raw["compress"] |= {"enabled": True, "teacher": "mlp", "bases": ["teacher"], "fuse": False, "n_jobs": 2,
                        "runner": "dask", "distill": {**raw["compress"]["distill"], "enabled": False},
                        "prune": {"unstructured": [round(0.1 + 0.8 * i / max(1, variants - 1), 3)
                                                   for i in range(variants)], "structured": [],
                                  "finetune_epochs": finetune, "lr": 0.001},
                        "quantize": {**raw["compress"]["quantize"], "options": ["int8-dyn"],
                                     "after_structured": False, "accuracy_aware": False}}
    raw["compress"]["select"] |= {"max_drop_vs_teacher": 100.0, "min_accuracy": 0.0}
    return raw


@dataclass(frozen=True)
class Bench:
    root: Path
    params: Params
    data: DataVersion
    teacher: Built  # compression starts from it in every run
    parent: str  # the MLflow run the variants nest under


def warm(root: Path, params: Params) -> str:
    """On a worker: what its first task would otherwise pay once per process (imports, the first ONNX export, the
    first MLflow and Optuna connections), kept out of the timings."""
    import torch

    import tasks.compress  # noqa: F401  (prefect, mlflow, onnxruntime, torch)
    from ottimo.models import tune
    from ottimo.onnx.export import export_onnx
    from ottimo.registry.tracking import connect
    from ottimo.spec import InputSpec

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(torch.nn.Sequential(torch.nn.Linear(4, 2)), InputSpec("tabular", (4,), "float32"),
                    Path(tmp) / "m.onnx")
    connect(root, params.mlflow)
    tune.open_storage(tune.storage_url(root, params.tune))
    return "warm"


@flow(name="bench-teacher")
def teacher_flow(root: Path, params: Params, data: DataVersion) -> tuple[Built, str]:
    """The teacher trained and exported as the pipeline does: its Built record and its pipeline run."""
    from tasks.compress import from_trained
    from tasks.evaluate import export_candidate
    from tasks.train import start_pipeline_run, train_candidate

    run_id = start_pipeline_run(root, params, data)
    cand = train_candidate(root, params, "mlp", data, run_id)
    return from_trained(params, cand, export_candidate(root, params, cand, data)), run_id


def fan_out_seconds(flow_run_id, prefixes: tuple[str, ...]) -> float:
    """From the first start to the last end of the flow run's task runs named with `prefixes` (the fan-out on the
    workers), from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:  # limit and sort given: the 3.8 client sends None otherwise (422)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    mine = [r for r in runs if r.name.startswith(prefixes)]
    return (max(r.end_time for r in mine) - min(r.start_time for r in mine)).total_seconds()


def tune_once(b: Bench, address: str, tag: str, trials: int) -> tuple[int, float, float]:
    """One tuning flow run on the cluster at `address`: (trials run, flow seconds, fan-out seconds)."""
    from flows.tune import tuning
    from tasks.runner import task_runner

    p = b.params.model_copy(update={"tune": b.params.tune.model_copy(update={
        "dask_address": address, "n_trials": trials, "study_name": f"bench-{tag}"})})
    t0 = time.perf_counter()
    state = tuning.with_options(task_runner=task_runner(b.root, p, "tune"))(str(b.root), data=b.data, params=p,
                                                                            return_state=True)
    wall, r = time.perf_counter() - t0, state.result()["mlp"]
    return r.complete + r.pruned, wall, fan_out_seconds(state.state_details.flow_run_id, ("run_trials",))


def compress_once(b: Bench, address: str, prune: PruneCfg | None = None) -> tuple[int, float, float]:
    """One compression flow run on the cluster at `address` (`prune`: other pruning variants than the bench's):
    (variants built, flow seconds, fan-out seconds)."""
    from flows.compress import compression
    from tasks.runner import task_runner

    cfg = b.params.compress
    p = b.params.model_copy(update={"compress": cfg.model_copy(update={"dask_address": address,
                                                                        "prune": prune or cfg.prune})})
    t0 = time.perf_counter()
    state = compression.with_options(task_runner=task_runner(b.root, p, "compress"))(
        str(b.root), trained=[b.teacher], data=b.data, parent_run_id=b.parent, params=p, return_state=True)
    wall, n = time.perf_counter() - t0, len(state.result().built) - 1  # the teacher is not a variant
    return n, wall, fan_out_seconds(state.state_details.flow_run_id, ("prune_variant", "quantize_variant"))


def dask_setup(folder: Path, args: argparse.Namespace) -> tuple[Path, Params, DataVersion, dict[str, str]]:
    """The bench's project (its data prepared without DVC) and the environment of the worker processes."""
    from ottimo.config import parse_params
    from ottimo.data.tables import materialise_raw, prepare

    root = folder / "project"
    root.mkdir()
    params = parse_params(dask_params(args.width, args.epochs, args.variants, args.finetune))
    materialise_raw(root, params.data)
    prepare(root, params.data, root / "data" / "prepared")
    env = os.environ | {"PREFECT_HOME": str(folder / "prefect"),  # the workers import this checkout
                        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return root, params, DataVersion("bench", str(root / "data" / "prepared"), True), env


def dask_part(args: argparse.Namespace) -> None:
    from distributed import Client
    from prefect.testing.utilities import prefect_test_harness

    from ottimo.ops import dask_cluster

    folder = Path(tempfile.mkdtemp(prefix="ottimo-bench-scale-"))
    root, params, data, env = dask_setup(folder, args)
    print(f"dask: tuning {args.trials} trials x {args.epochs} epochs, compression {args.variants} pruning variants x "
          f"{args.finetune} epochs + int8-dyn, MLP [{args.width}, {args.width}] on {params.data.builtin}; "
          f"{args.repeats} repeat(s); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    with (dask_cluster.throwaway(folder / "one", 1, env) as one, dask_cluster.throwaway(folder / "two", 2, env) as two,
          prefect_test_harness(server_startup_timeout=120)):
        for c in (one, two):
            with Client(c.address, set_as_default=False) as client:
                client.run(warm, root, params)
        b = Bench(root, params, data, *teacher_flow(root, params, data))
        arms = {"1 worker": one.address, "2 workers": two.address}
        for address in arms.values():  # a worker's first flow run of each kind pays seconds once: not timed
            tune_once(b, address, f"warm-{address}", 2)
            compress_once(b, address, PruneCfg(unstructured=[0.3, 0.6], structured=[], finetune_epochs=1))
        runs = {"trials": lambda address, tag: tune_once(b, address, tag, args.trials),
                "variants": lambda address, tag: compress_once(b, address)}
        rates = {(k, w, a): [] for k in ("fan-out", "flow") for w in runs for a in arms}
        for r in range(args.repeats):
            for what, once in runs.items():
                for arm in (list(arms) if r % 2 == 0 else list(reversed(arms))):
                    n, wall, span = once(arms[arm], f"{r}-{arm[0]}")
                    rates["fan-out", what, arm].append(60 * n / span)
                    rates["flow", what, arm].append(60 * n / wall)
                    print(f"  repeat {r + 1} {what:<8} {arm:<9} {n:3d}: fan-out {span:6.1f} s = "
                          f"{60 * n / span:6.1f}/min; flow run {wall:6.1f} s = {60 * n / wall:6.1f}/min", flush=True)
    report(rates)


def report(rates: dict[tuple[str, str, str], list[float]]) -> None:
    """Per workload and timing: the median rate of each arm, the 2-worker / 1-worker ratio (per repeat, paired) as
    median [min-max], against the goal."""
    print(f"\n{'per minute':<46} {'1 worker':>9} {'2 workers':>10} {'ratio median [min-max]':>23}  goal >= {GOAL}x")
    for what, label in (("trials", "tuning trials"), ("variants", "compression variants")):
        for timing, how in (("fan-out", "fan-out on the workers"), ("flow", "whole flow run")):
            a, b = rates[timing, what, "1 worker"], rates[timing, what, "2 workers"]
            ratios = [y / x for x, y in zip(a, b, strict=True)]
            verdict = ("met" if statistics.median(ratios) >= GOAL else "not met") if timing == "fan-out" else ""
            print(f"{label + ', ' + how:<46} {statistics.median(a):9.1f} {statistics.median(b):10.1f} "
                  f"{statistics.median(ratios):8.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]  {verdict}")


# --- the parts --------------------------------------------------------------------------------------------------

def prefect_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("prefect (bench/prefect_scale.py)")
    g.add_argument("--flow-runs", type=int, default=4, help="flow runs submitted at once per measurement")
    g.add_argument("--flow-epochs", type=int, default=60, help="training epochs inside each flow run")


def prefect_part(args: argparse.Namespace) -> None:
    """Flow runs per minute through a process work pool with 1 vs 2 Prefect workers."""
    import prefect_scale

    print("\n## prefect: flow runs per minute through 1 vs 2 Prefect workers (a process work pool)")
    print(prefect_scale.report(prefect_scale.run(args.repeats, args.flow_runs, args.flow_epochs)))


def optuna_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("optuna (bench/optuna_scale.py)")
    g.add_argument("--processes", type=int, default=8, help="Optuna processes on one study")
    g.add_argument("--study-trials", type=int, default=80, help="trials in the study, over all processes")


def optuna_part(args: argparse.Namespace) -> None:
    """8 concurrent Optuna processes on one study: Postgres vs SQLite."""
    import optuna
    import optuna_scale

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"\n## optuna: {args.processes} processes on one study of {args.study_trials} trials, Postgres vs SQLite")
    optuna_scale.run(args.processes, args.study_trials)


PARTS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "dask": (dask_args, dask_part),
    "prefect": (prefect_args, prefect_part),
    "optuna": (optuna_args, optuna_part),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of every arm, the order alternating")
    for add_args, _ in PARTS.values():
        add_args(ap)
    args = ap.parse_args()
    os.environ.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    for name, (_, run) in PARTS.items():
        if args.part in (name, "all"):
            run(args)


if __name__ == "__main__":
    main()
