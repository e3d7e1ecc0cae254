"""What compression buys: every candidate of params.yaml's `compress:` section against the FP32 teacher.

On the default data (prepared into a temporary folder), the teacher (`compress.teacher`, trained with params.yaml's
settings) is distilled, pruned and quantized exactly as the pipeline's compression stage does
(ottimo.compress.techniques, ottimo.compress.quantize), then every candidate is measured one after another in this
process with `evaluate:`'s settings (warm-up, runs, `evaluate.threads` onnxruntime threads; torch on as many threads).
The teacher is also timed in PyTorch eager at batch 1. Printed: per candidate accuracy, p50/p95 at batch 1, rows/s at
batch 64, size, the ratios against the teacher in onnxruntime FP32 and in PyTorch eager, notes where a technique does
not pay on this CPU, and whether the selected candidate meets the goals (>= 10x faster than eager at p50, >= 3x faster
than onnxruntime FP32 at p50, >= 4x smaller, accuracy drop <= 1.0 point).

    .venv/bin/python bench/compression.py
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ottimo.compress import pareto, quantize, techniques
from ottimo.config import CompressCfg, DistillCfg, Params, load_params
from ottimo.data.tables import Splits, load_splits, materialise_raw, prepare
from ottimo.models.family import Recipe, count_parameters, recipe
from ottimo.models.train import fit
from ottimo.onnx.export import export_onnx
from ottimo.onnx.measure import measure, predict, session

REPO = Path(__file__).resolve().parent.parent
GOALS = {"eager": 10.0, "ort": 3.0, "smaller": 4.0, "drop": 1.0}


def eager_latency(model: torch.nn.Module, X: np.ndarray, warmup: int, runs: int) -> tuple[float, float]:
    """p50 / p95 ms of single-row inference in PyTorch eager (inference mode), rows (already shaped as the model
    takes them) cycled like ottimo.onnx.measure."""
    rows = [torch.from_numpy(X[i % len(X)][None]) for i in range(warmup + runs)]
    times = []
    with torch.inference_mode():
        for i, row in enumerate(rows):
            t0 = time.perf_counter_ns()
            model(row)
            if i >= warmup:
                times.append(time.perf_counter_ns() - t0)
    p50, p95 = np.percentile(times, [50, 95]) / 1e6
    return float(p50), float(p95)


def student_recipe(params: Params, d: DistillCfg) -> Recipe:
    """The distillation student's recipe, as the pipeline's distill_student task makes it."""
    return recipe(params.families, params.train, d.student, {"hparams": d.hparams,
                                                             "train": {"lr": d.lr} if d.lr else {}})


def build(params: Params, teacher: torch.nn.Module, splits: Splits, out: Path, cfg: CompressCfg | None = None,
          notes: list[str] | None = None) -> list[dict]:
    """The candidates of `compress:` (or `cfg`, a CompressCfg), as the compression flow makes them:
    [{name, technique, base, path, model, parameters, sparsity, error}]. A structured pruning that finds nothing to
    remove is left out with its reason in `notes`, as the flow skips it; a quantized model whose predictions agree
    with its FP32 source on fewer than `quantize.min_agreement` of the test rows gets an `error` (disqualified)."""
    cfg, spec, n_classes = cfg or params.compress, splits.input, len(splits.labels)
    seed, batch = params.project.seed, params.train.batch_size
    notes = [] if notes is None else notes

    def onnx_row(model, name, technique, base):
        path = export_onnx(model, spec, out / f"{name}.onnx")
        return {"name": name, "technique": technique, "base": base, "path": path, "model": model,
                "parameters": count_parameters(model), "sparsity": techniques.sparsity(model), "error": None}

    name = cfg.teacher
    rows = [onnx_row(teacher, name, "trained", "")]
    bases = [rows[0]] if "teacher" in cfg.bases else []
    if cfg.distill.enabled:
        d = cfg.distill
        r = student_recipe(params, d)
        spec_d = techniques.FinetuneSpec(d.epochs, r.lr, batch, seed)
        student = techniques.distill(teacher, splits, r, spec_d, d.temperature, d.alpha)
        rows.append(onnx_row(student, f"student-{d.student}", "distill", name))
        bases += [rows[-1]] if "student" in cfg.bases else []
    ft = techniques.FinetuneSpec(cfg.prune.finetune_epochs, cfg.prune.lr, batch, seed)
    structured = []
    for base in bases:
        for amount in cfg.prune.unstructured:
            m = techniques.magnitude_prune(copy.deepcopy(base["model"]), amount)
            m = techniques.make_permanent(techniques.finetune(m, splits, ft))
            rows.append(onnx_row(m, f"{base['name']}+prune-u{round(amount * 100)}", "prune-unstructured",
                                 base["name"]))
        for amount in cfg.prune.structured:
            pruned_name = f"{base['name']}+prune-s{round(amount * 100)}"
            try:
                m = techniques.structured_prune(base["model"], spec, n_classes, amount)
            except techniques.NotPrunable as err:
                notes.append(f"{pruned_name} skipped: {err}")
                continue
            m = techniques.make_permanent(techniques.finetune(m, splits, ft))
            rows.append(onnx_row(m, pruned_name, "prune-structured", base["name"]))
            structured.append(rows[-1])
    q = cfg.quantize
    calib = splits.rows(splits.X_train[np.random.default_rng(seed).choice(
        len(splits.X_train), min(q.calibration_rows, len(splits.X_train)), replace=False)])
    for base in bases + (structured if q.after_structured else []):
        for method in q.methods:
            dst = out / f"{base['name']}+int8-{method}.onnx"
            if method == "dynamic":
                quantize.dynamic_int8(base["path"], dst, q.per_channel, q.reduce_range)
            else:
                quantize.static_int8(base["path"], dst, calib, q.per_channel, q.reduce_range)
            agreement = float((predict(session(dst), splits.X_test) == predict(session(base["path"]),
                                                                                splits.X_test)).mean())
            error = None if agreement >= q.min_agreement else (
                f"predictions agree with the FP32 model on {agreement:.1%} of test rows (< min_agreement "
                f"{q.min_agreement:.1%})")
            rows.append({**base, "name": dst.stem, "technique": f"int8-{method}", "base": base["name"], "path": dst,
                         "error": error})
    return rows


def main() -> None:
    params = load_params(REPO / "params.yaml")
    threads = params.evaluate.threads
    torch.set_num_threads(threads)
    folder = Path(tempfile.mkdtemp(prefix="ottimo-bench-compress-"))
    try:
        materialise_raw(folder, params.data)
        prepare(folder, params.data, folder / "prepared")
        splits = load_splits(folder / "prepared")
        t0 = time.perf_counter()
        teacher = fit(recipe(params.families, params.train, params.compress.teacher), splits, params.train,
                      params.project.seed).model
        print(f"teacher {params.compress.teacher} trained in {time.perf_counter() - t0:.0f} s; building candidates")
        t0 = time.perf_counter()
        notes: list[str] = []
        built = build(params, teacher, splits, folder, notes=notes)
        for note in notes:
            print(note)
        print(f"{len(built)} candidates built in {time.perf_counter() - t0:.0f} s; measuring one after another "
              f"({threads} thread(s), {params.evaluate.warmup} warm-up + {params.evaluate.runs} runs at batch 1, "
              f"rows/s at batch {params.evaluate.throughput_batch})\n")
        ev = params.evaluate
        eager50, eager95 = eager_latency(teacher.eval(), splits.rows(splits.X_test), ev.warmup, ev.runs)
        rows = []
        for b in built:
            m, _ = measure(b["path"], splits.X_test, splits.y_test, ev)
            rows.append(pareto.Row(b["name"], b["technique"], b["base"], m.as_dict(), b["parameters"], b["sparsity"],
                                   error=b["error"]))
        report(params, rows, eager50, eager95)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(params: Params, rows: list[pareto.Row], eager50: float, eager95: float) -> None:
    t = rows[0].metrics
    sel = pareto.select(rows, t["accuracy"], params.compress.select)
    print(f"{'candidate':40} {'acc':>7} {'p50 ms':>8} {'p95 ms':>8} {'rows/s@64':>10} {'kB':>7} {'params':>7} "
          f"{'sparse':>6} {'x ORT':>6} {'x eager':>7} {'smaller':>7}")
    print(f"{'teacher in PyTorch eager':40} {t['accuracy']:7.4f} {eager50:8.4f} {eager95:8.4f}")
    for r in rows:
        m = r.metrics
        print(f"{('* ' if r.name == sel.chosen else '') + r.name:40} {m['accuracy']:7.4f} {m['p50_ms']:8.4f} "
              f"{m['p95_ms']:8.4f} {m['throughput_rps']:10,.0f} {m['size_mb'] * 1e3:7.1f} {r.parameters:7,} "
              f"{r.sparsity:6.2f} {t['p50_ms'] / m['p50_ms']:6.2f} {eager50 / m['p50_ms']:7.1f} "
              f"{t['size_mb'] / m['size_mb']:7.1f}" + (f"  (disqualified: {r.error})" if r.error else ""))
    by = {r.name: r for r in rows}
    print("\nWhere a technique does not pay on this CPU (p50 at batch 1 against the model it was made from):")
    for r in rows:
        if r.base and r.technique != "distill":
            base = by[r.base].metrics
            ratio = base["p50_ms"] / r.metrics["p50_ms"]
            verdict = "SLOWER" if ratio < 0.97 else ("no speed-up" if ratio < 1.03 else "faster")
            print(f"  {r.name:40} {r.metrics['p50_ms']:.4f} vs {base['p50_ms']:.4f} ms: {ratio:.2f}x ({verdict}); "
                  f"size {by[r.base].metrics['size_mb'] / r.metrics['size_mb']:.1f}x smaller")
    print(f"\nSelection ({params.compress.select.objective}, max drop {params.compress.select.max_drop_vs_teacher} "
          f"points, floor {params.compress.select.min_accuracy}): {sel.chosen}")
    if sel.chosen is None:
        print("  no candidate qualifies: " + sel.summary)
        return
    c = by[sel.chosen].metrics
    drop = (t["accuracy"] - c["accuracy"]) * 100
    checks = [(eager50 / c["p50_ms"] >= GOALS["eager"], f"p50 {eager50 / c['p50_ms']:.1f}x faster than eager "
               f"(goal >= {GOALS['eager']:.0f}x)"),
              (t["p50_ms"] / c["p50_ms"] >= GOALS["ort"], f"p50 {t['p50_ms'] / c['p50_ms']:.1f}x faster than ORT FP32 "
               f"(goal >= {GOALS['ort']:.0f}x)"),
              (t["size_mb"] / c["size_mb"] >= GOALS["smaller"], f"{t['size_mb'] / c['size_mb']:.1f}x smaller "
               f"(goal >= {GOALS['smaller']:.0f}x)"),
              (drop <= GOALS["drop"], f"accuracy drop {drop:+.2f} points (goal <= {GOALS['drop']:.1f})")]
    for ok, text in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")


if __name__ == "__main__":
    main()
