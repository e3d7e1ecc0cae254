"""What compression buys per model family: every built-in family on its default data, its FP32 teacher against the
candidate the pipeline's selection would pick, side by side in one run.

Rows: the mlp on digits (tabular, 64 columns), the cnn on digits as [1, 8, 8] images (data.input {kind: image}),
the transformer on digits (patches of a tabular row) and the transformer on the generated token sequences
(`data.builtin: sequences`). Per row, on the
data prepared into a temporary folder:

1. the teacher is trained with params.yaml's settings (`train:`, the family's `families.<name>` hparams and train);
2. it is compressed with the pipeline's techniques (ottimo.compress.techniques / quantize, through
   bench/compression.py's `build`, the flow's order): distillation into a smaller student of a family that takes
   these rows (params.yaml's `compress.distill` student for numeric rows, a one-layer transformer for token ids),
   structured pruning (torch-pruning) + fine-tuning at `compress.prune.structured` of the teacher and the student,
   dynamic INT8 of those (`quantize.after_structured`). Unstructured pruning (zeros, no speed in onnxruntime) and
   static INT8 are bench/compression.py's business;
3. every candidate is exported to ONNX and measured with ottimo.onnx.measure (accuracy and size on the test split;
   p50/p95 at batch 1 on `evaluate.threads` threads): `--rounds` rounds, each timing every candidate once
   (`evaluate.warmup` + `evaluate.runs` runs) in an order rotated per round, so teacher and candidates share the
   machine's noise; the figures are the medians over rounds, the p50 speed-up the median of the per-round ratios
   (teacher and candidate timed in the same round) with their min-max;
4. `ottimo.compress.pareto.select` with `compress.select` (no gate) picks the candidate.

Printed: each row's candidates, then one table: teacher and selected candidate, speed-up at p50, how many times
smaller, accuracy drop in points.

    .venv/bin/python bench/families.py            # params.yaml's epochs (a few minutes on 2 cores)
    .venv/bin/python bench/families.py --quick    # fewer epochs and timing runs: a check that it works
    .venv/bin/python bench/families.py --example  # also the README's own family (examples/own-model) on images
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this clone's ottimo and bench/compression.py

from bench.compression import build  # noqa: E402
from ottimo.compress import pareto  # noqa: E402
from ottimo.config import CompressCfg, DataCfg, Params, deep_merge, importable, load_params  # noqa: E402
from ottimo.data.tables import Splits, load_splits, materialise_raw, prepare  # noqa: E402
from ottimo.models.family import recipe  # noqa: E402
from ottimo.models.train import fit  # noqa: E402
from ottimo.onnx.measure import latency_ms, measure, session  # noqa: E402

DIGITS = {"builtin": "digits", "path": "data/raw/digits.csv", "features": None, "labels": None}
SMALL_TRANSFORMER = {"d_model": 16, "heads": 2, "layers": 1, "ff_dim": 32, "dropout": 0.0}


@dataclass(frozen=True)
class Case:
    """One row of the bench: a family on a data set (params.yaml's `data:` with `data` laid over it), distilled
    into `student` (None: compress.distill's student and hparams) with `student_hparams`."""

    family: str
    label: str
    data: dict
    student: str | None = None
    student_hparams: dict = field(default_factory=dict)
    needs_builtin: str | None = None  # a data.builtin this tree may not have yet


CASES = [
    Case("mlp", "digits tabular [64]", {**DIGITS, "input": {"kind": "tabular"}}),
    Case("cnn", "digits image [1,8,8]", {**DIGITS, "input": {"kind": "image", "shape": [1, 8, 8]}}),
    Case("transformer", "digits tabular [64]", {**DIGITS, "input": {"kind": "tabular"}}),
    Case("transformer", "sequences (token ids)", {
        "builtin": "sequences", "path": "data/raw/sequences.csv", "features": None, "labels": None,
        "input": {"kind": "sequence"}}, student="transformer", student_hparams=SMALL_TRANSFORMER,
        needs_builtin="sequences"),
]
EXAMPLE = REPO / "examples" / "own-model"  # --example: the README's own family (mymodels/net.py), its params
EXAMPLE_CASE = Case("mynet", "digits image [1,8,8]", {**DIGITS, "input": {"kind": "image", "shape": [1, 8, 8]}})
QUICK = {"train": {"max_epochs": 15, "patience": 4},
         "compress": {"distill": {"epochs": 10}, "prune": {"finetune_epochs": 3}},
         "evaluate": {"warmup": 20, "runs": 100}}


def builtin_names() -> set[str]:
    """The data sets `data.builtin` accepts in this tree (its Literal, through the Optional)."""
    def names(t) -> set[str]:
        args = typing.get_args(t)
        return {a for a in args if isinstance(a, str)} | {n for a in args if not isinstance(a, str) for n in names(a)}

    return names(DataCfg.model_fields["builtin"].annotation)


def case_compress(params: Params, case: Case) -> CompressCfg:
    """The pipeline's compress: section for this row: its family as teacher, the row's student, structured
    pruning and dynamic INT8 only."""
    c = params.compress
    distill = c.distill.model_dump() | {"enabled": True} | (
        {"student": case.student, "hparams": case.student_hparams} if case.student else {})
    return CompressCfg.model_validate(c.model_dump() | {
        "enabled": True, "teacher": case.family, "distill": distill,
        "prune": c.prune.model_dump() | {"unstructured": []},
        "quantize": c.quantize.model_dump() | {"options": ["int8-dyn"]}})


def prepared(folder: Path, params: Params, case: Case) -> Splits:
    data = DataCfg.model_validate(deep_merge(params.data.model_dump(), case.data))
    materialise_raw(folder, data)
    prepare(folder, data, folder / "prepared")
    return load_splits(folder / "prepared")


def measured(params: Params, splits: Splits, built: list[dict], rounds: int) -> tuple[list[pareto.Row], dict]:
    """Accuracy, F1, throughput and size once per candidate (ottimo.onnx.measure.measure), then `rounds` rounds of
    batch-1 latency, every candidate once per round in a rotated order; p50/p95 are the medians over rounds.
    Returns the rows and each candidate's per-round p50s."""
    ev = params.evaluate
    sessions = {b["name"]: session(b["path"], ev.threads) for b in built}
    base = {b["name"]: measure(b["path"], splits.X_test, splits.y_test, ev)[0].as_dict() for b in built}
    p50s: dict[str, list[float]] = {name: [] for name in sessions}
    p95s: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            p50, p95 = latency_ms(sessions[name], splits.X_test, ev.warmup, ev.runs)
            p50s[name].append(p50)
            p95s[name].append(p95)
    rows = [pareto.Row(b["name"], b["technique"], b["base"], base[b["name"]] | {
        "p50_ms": statistics.median(p50s[b["name"]]), "p95_ms": statistics.median(p95s[b["name"]])},
        b["parameters"], b["sparsity"], error=b["error"]) for b in built]
    return rows, p50s


def run_case(params: Params, case: Case, rounds: int, folder: Path) -> dict | str:
    """One row, or the reason it was skipped."""
    if case.needs_builtin and case.needs_builtin not in builtin_names():
        return (f"data.builtin {case.needs_builtin!r} is not in this tree (builtins: {sorted(builtin_names())}); the "
                "row runs once it is")
    try:
        splits = prepared(folder, params, case)
    except Exception as err:  # a builtin from another branch may want settings this row does not give
        return f"its data could not be prepared ({type(err).__name__}: {err})"
    cfg = case_compress(params, case)
    t0 = time.perf_counter()
    teacher = fit(recipe(params.families, params.train, case.family), splits, params.train,
                  params.project.seed).model
    trained = time.perf_counter() - t0
    notes: list[str] = []
    t0 = time.perf_counter()
    built = build(params, teacher, splits, folder, cfg, notes)
    made = time.perf_counter() - t0
    rows, p50s = measured(params, splits, built, rounds)
    by = {r.name: r for r in rows}
    sel = pareto.select(rows, by[case.family].metrics["accuracy"], params.compress.select)
    print(f"\n{case.family} on {case.label}: {splits.input.describe()}, {len(splits.labels)} classes, "
          f"{len(splits.y_train)} train / {len(splits.y_test)} test rows; teacher trained in {trained:.0f} s, "
          f"{len(built) - 1} candidates made in {made:.0f} s (student: {cfg.distill.student} "
          f"{cfg.distill.hparams or ''})")
    for note in notes:
        print(f"  {note}")
    print(f"  {'candidate':38} {'acc':>6} {'p50 ms':>7} {'[min-max]':>15} {'p95 ms':>7} {'kB':>6} {'params':>7}")
    for r in rows:
        m, lo, hi = r.metrics, min(p50s[r.name]), max(p50s[r.name])
        mark = "* " if r.name == sel.chosen else "  "
        print(f"{mark}{r.name:38} {m['accuracy']:6.4f} {m['p50_ms']:7.4f} [{lo:6.4f}-{hi:6.4f}] {m['p95_ms']:7.4f} "
              f"{m['size_mb'] * 1e3:6.1f} {r.parameters:7,}" + (f"  ({r.error})" if r.error else ""))
    if sel.chosen is None:
        return {"case": case, "teacher": by[case.family], "chosen": None, "why": sel.summary}
    ratios = [t / c for t, c in zip(p50s[case.family], p50s[sel.chosen], strict=True)]
    return {"case": case, "teacher": by[case.family], "chosen": by[sel.chosen], "speedup": statistics.median(ratios),
            "lo": min(ratios), "hi": max(ratios)}


def table(results: list[dict | tuple[Case, str]], rounds: int) -> None:
    print(f"\nTeacher (FP32, onnxruntime) against the selected candidate; p50/p95 ms at batch 1 (medians of {rounds} "
          "interleaved rounds), speed-up = median of the per-round p50 ratios [min-max]:")
    head = (f"{'family':12} {'data':22} {'t.acc':>6} {'t.p50':>7} {'t.p95':>7} {'t.kB':>6}  {'selected':34} "
            f"{'acc':>6} {'p50':>7} {'p95':>7} {'kB':>6} {'speed-up p50':>19} {'smaller':>7} {'drop pt':>7}")
    print(head)
    print("-" * len(head))
    for res in results:
        if isinstance(res, tuple):
            case, why = res
            print(f"{case.family:12} {case.label:22} skipped: {why}")
            continue
        case, t = res["case"], res["teacher"].metrics
        lead = (f"{case.family:12} {case.label:22} {t['accuracy']:6.4f} {t['p50_ms']:7.4f} {t['p95_ms']:7.4f} "
                f"{t['size_mb'] * 1e3:6.1f}  ")
        if res["chosen"] is None:
            print(lead + f"none qualifies: {res['why']}")
            continue
        c = res["chosen"].metrics
        speed = f"{res['speedup']:.2f}x [{res['lo']:.2f}-{res['hi']:.2f}]"
        print(lead + f"{res['chosen'].name:34} {c['accuracy']:6.4f} {c['p50_ms']:7.4f} {c['p95_ms']:7.4f} "
              f"{c['size_mb'] * 1e3:6.1f} {speed:>19} {t['size_mb'] / c['size_mb']:6.1f}x "
              f"{(t['accuracy'] - c['accuracy']) * 100:+7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and timing runs (a check, not a measurement)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved latency rounds (default 5, --quick 3)")
    ap.add_argument("--example", action="store_true", help="also the README's own family, examples/own-model")
    args = ap.parse_args()
    params = load_params(REPO / "params.yaml")
    cases = list(CASES)
    if args.example:  # its family entry (builder, hparams, train) beside the built-in ones, its module importable
        importable(EXAMPLE)
        mine = yaml.safe_load((EXAMPLE / "params.yaml").read_text())["families"]
        params = params.overridden({"families": mine})
        cases.append(EXAMPLE_CASE)
    if args.quick:
        params = params.overridden(QUICK)
    rounds = args.rounds or (3 if args.quick else 5)
    torch.set_num_threads(params.evaluate.threads)
    ev, sel = params.evaluate, params.compress.select
    print(f"families bench{' (--quick)' if args.quick else ''}: train max_epochs {params.train.max_epochs} patience "
          f"{params.train.patience}, distill {params.compress.distill.epochs} epochs, prune "
          f"{params.compress.prune.structured} + {params.compress.prune.finetune_epochs} fine-tuning epochs; "
          f"latency {ev.threads} thread(s), {ev.warmup} warm-up + {ev.runs} runs x {rounds} rounds; selection "
          f"{sel.objective}, max drop {sel.max_drop_vs_teacher} points, floor {sel.min_accuracy}; {os.cpu_count()} "
          f"CPUs, load {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    results: list = []
    for i, case in enumerate(cases):
        folder = Path(tempfile.mkdtemp(prefix=f"ottimo-bench-families-{i}-"))
        try:
            res = run_case(params, case, rounds, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(res, str):
            print(f"\n{case.family} on {case.label}: skipped: {res}")
            res = (case, res)
        results.append(res)
    table(results, rounds)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
