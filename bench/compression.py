"""What compression buys: every candidate of params.yaml's `compress:` section against the FP32 teacher.

On the default data (prepared into a temporary folder), the teacher (`compress.teacher`, trained with params.yaml's
settings) is distilled, pruned and quantized exactly as the pipeline's compression stage does
(ottimo.compress.techniques, ottimo.compress.quantize), then every candidate is measured one after another in this
process with `evaluate:`'s settings (warm-up, runs, `evaluate.threads` onnxruntime threads; torch on as many threads).
The teacher is also timed in PyTorch eager at batch 1. Printed: per candidate accuracy, p50/p95 at batch 1, rows/s at
batch 64, size, the ratios against the teacher in onnxruntime FP32 and in PyTorch eager, notes where a technique does
not pay on this CPU, and whether the selected candidate meets the goals (>= 10x faster than eager at p50, >= 3x faster
than onnxruntime FP32 at p50, >= 4x smaller, accuracy drop <= 1.0 point). INT8 candidates are made as the
pipeline makes them: one per `compress.quantize.options` entry (ottimo.compress.quantize.quantize).

    .venv/bin/python bench/compression.py

With a named params profile (`--profile transformer`: params.transformer.yaml at the repo root, or `--params FILE`),
the side-by-side bench of GitHub issue 15, in one run: the teacher trained (seeded) and exported; then FP32
onnxruntime, PyTorch eager on the deciding target (batch 1), the fused FP32 graph (ottimo.compress.fusion, its
report printed), every quantize option from the fused graph and dynamic INT8 from the unfused one, and with
`quantize.accuracy_aware` an accuracy-aware INT8 per option (ottimo.compress.sensitivity on the validation split,
tolerance `compress.select.max_drop_vs_teacher`) where it keeps nodes in FP32. Every ONNX candidate is timed
interleaved (ottimo.onnx.latency.measure) on each of `evaluate.targets`; per candidate: test accuracy and drop,
p50/p95 with 95% bootstrap intervals, the p50 speed-up against FP32 onnxruntime (paired bootstrap over the rounds),
size and size ratio. `pareto.select` (with the gate's thresholds, no champion) picks one from rows built as
tasks/compress.measure_candidates builds them; the goals are checked on it (or, when it is not INT8, on the INT8
candidate the same rule picks): >= 2.0x faster p50 than FP32 onnxruntime, >= 3.5x smaller, <= 0.5 points drop.
Then `--repeats` fresh measurements + selections: how often the same model is chosen and, when not, whether the
choices lie in the statistically tied first tier (ottimo.onnx.latency.tiers).

    .venv/bin/python bench/compression.py --profile transformer            # ~9 min on 2 busy cores
    .venv/bin/python bench/compression.py --profile transformer --epochs 1 --rounds 40 --repeats 2  # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from ottimo.compress import fusion, pareto, quantize, sensitivity, techniques
from ottimo.config import CompressCfg, DistillCfg, Params, load_params
from ottimo.data.tables import Splits, load_splits, materialise_raw, prepare
from ottimo.models.family import Recipe, count_parameters, recipe
from ottimo.models.train import fit
from ottimo.onnx import latency
from ottimo.onnx.export import export_onnx
from ottimo.onnx.measure import measure, predict, session
from ottimo.registry.gate import check

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
    calib = quantize.calibration_sample(splits, q.calibration_rows, params.project.seed)
    for base in bases + (structured if q.after_structured else []):
        for name in q.options:
            option = quantize.QuantOption.parse(name)
            dst = out / f"{base['name']}+{option.name}.onnx"
            quantize.quantize(base["path"], dst, option, calib if option.needs_calibration else None)
            agree = quantize.agreement(dst, Path(base["path"]), splits.X_test)
            rows.append({**base, "name": dst.stem, "technique": option.name, "base": base["name"], "path": dst,
                         "error": quantize.disagreement(agree, q.min_agreement)})
    return rows


def default_main() -> None:
    """The bench on params.yaml, as it has always run: candidates measured one after another."""
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


# ---- a named params profile, every candidate side by side (GitHub issue 15) ----------------------------------------

PROFILE_GOALS = {"speedup": 2.0, "smaller": 3.5, "drop": 0.5}  # the selected INT8 candidate against FP32 ORT


@dataclass
class Cand:
    """One ONNX candidate of the profile bench: how it was made and what it is made from."""

    name: str
    technique: str  # trained | fuse | an option's name | <option> accuracy-aware
    base: str
    path: Path
    parameters: int
    error: str | None = None
    settings: dict = field(default_factory=dict)


def eager_samples(model: torch.nn.Module, X: np.ndarray, batch: int, warmup: int, runs: int) -> list[float]:
    """Per-call ms of PyTorch eager (inference mode) on `batch` rows of X (shaped as the model takes them) per call,
    the rows cycled like ottimo.onnx.latency.measure."""
    feeds = [torch.from_numpy(X[(np.arange(batch) + k * batch) % len(X)]) for k in range(8)]
    out = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter_ns()
            model(feeds[i % 8])
            if i >= warmup:
                out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def ratio(ref: Sequence[float], cand: Sequence[float], n_boot: int = 2000, seed: int = 0) -> latency.Interval:
    """median(ref) / median(cand) (how many times faster cand is) and its 95% paired-bootstrap interval: the
    samples of one `latency.measure` are per round, so the same rounds are resampled for both."""
    a, b = np.asarray(ref, dtype=float), np.asarray(cand, dtype=float)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boots = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return latency.Interval(float(np.median(a) / np.median(b)), float(lo), float(hi))


def qualifying(rows: list[pareto.Row], teacher_accuracy: float, params: Params) -> list[pareto.Row]:
    """The rows pareto.select chooses among: within compress.select's floors, those the gate would pass first."""
    ok = [r for r in rows if pareto.refusals(r, teacher_accuracy, params.compress.select, None, None) is None]
    gate = params.gate.model_copy(update={"card": {}})
    return [r for r in ok if check(r.metrics, gate, None).passed] or ok


def first_tier(rows: list[pareto.Row], q: str) -> list[str]:
    """Names in the statistically tied fastest set (latency.tiers on percentile `q`'s 95% intervals), in the
    deterministic order the selection takes them (accuracy, size, name)."""
    cands = [latency.Candidate(r.name, latency.interval_of(r.metrics, q), r.metrics["accuracy"], r.metrics["size_mb"])
             for r in rows]
    return [c.name for c in latency.tiers(cands)[0]] if cands else []


def is_int8(technique: str) -> bool:
    return technique.startswith("int8-")


def _iv(iv: latency.Interval | None, fmt: str = ".3f") -> str:
    return "-" if iv is None else f"{iv.point:{fmt}} [{iv.low:{fmt}}, {iv.high:{fmt}}]"


def profile_main(params_path: Path, args: argparse.Namespace) -> None:
    """The profile bench: train the teacher, build every candidate, measure them interleaved, select, check the
    goals, repeat the measurement + selection for stability."""
    wall = time.perf_counter()
    params = load_params(params_path)
    if args.epochs:
        params = params.overridden({"train": {"max_epochs": args.epochs}})
    ev, cfg = params.evaluate, params.compress
    q, seed = cfg.quantize, params.project.seed
    targets = latency.targets(ev)
    deciding = targets[0]
    rounds = {t.name: (args.rounds or ev.runs) if t.batch == 1 else args.server_rounds for t in targets}
    warmup = {t.name: min(ev.warmup, max(2, rounds[t.name] // 10)) if t.batch > 1 else ev.warmup for t in targets}
    torch.set_num_threads(args.train_threads)
    folder = Path(tempfile.mkdtemp(prefix="ottimo-bench-profile-"))
    try:
        _profile(params, params_path, args, folder, targets, deciding, rounds, warmup, q, seed, ev, cfg)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nwall time {time.perf_counter() - wall:.0f} s")


def _profile(params, params_path, args, folder, targets, deciding, rounds, warmup, q, seed, ev, cfg) -> None:
    materialise_raw(folder, params.data)
    prepare(folder, params.data, folder / "prepared")
    splits = load_splits(folder / "prepared")
    spec, n_classes = splits.input, len(splits.labels)
    print(f"profile {params_path.name}: {params.data.builtin or params.data.path} {spec.describe()} "
          f"(vocab {spec.vocab_size}), {n_classes} classes (chance {1 / n_classes:.1%}), {len(splits.y_train)} train / "
          f"{len(splits.y_val)} val / {len(splits.y_test)} test rows")

    # 1. the teacher, seeded
    r = recipe(params.families, params.train, cfg.teacher)
    t0 = time.perf_counter()
    trained = fit(r, splits, params.train, seed, on_epoch=lambda e: print(
        f"  epoch {e['epoch']:.0f}: train loss {e['train_loss']:.4f}, val loss {e['val_loss']:.4f}, val accuracy "
        f"{e['val_accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True))
    teacher = trained.model.eval()
    n_params = count_parameters(teacher)
    print(f"teacher {cfg.teacher} {r.hparams}: {n_params:,} parameters, {trained.epochs_run} epochs (best "
          f"{trained.best_epoch}, val accuracy {trained.best_val_accuracy:.4f}) in {time.perf_counter() - t0:.0f} s "
          f"on {args.train_threads} torch thread(s)")

    # 2. the candidates
    t0 = time.perf_counter()
    fp32 = export_onnx(teacher, spec, folder / f"{cfg.teacher}.onnx")
    cands = [Cand(cfg.teacher, "trained", "", fp32, n_params)]
    quant_from, notes = cands[0], []
    if cfg.fuse:
        dst = folder / f"{cfg.teacher}+fused.onnx"
        try:
            rep = fusion.optimize(fp32, dst, check_rows=splits.X_test[:32])
        except fusion.FusionError as err:
            notes.append(f"{dst.stem} skipped: {err}")
            print(f"\nfusion failed: {err}")
        else:
            cands.append(Cand(dst.stem, "fuse", cfg.teacher, dst, n_params))
            quant_from = cands[-1]
            print("\nfusion (ottimo.compress.fusion.optimize, check_rows = 32 test rows):\n  " + rep.summary)
            print("  passes: " + "; ".join(rep.passes))
            watch = sorted({*rep.fused, "MatMul", "Gemm", "Softmax", "Transpose", "Reshape", "Add", "Mul"})
            print("  ops before -> after: " + ", ".join(
                f"{op} {rep.ops_before.get(op, 0)}->{rep.ops_after.get(op, 0)}" for op in watch
                if rep.ops_before.get(op, 0) or rep.ops_after.get(op, 0)))
            if not rep.fused:
                print("  nothing fused: the fused candidate is the FP32 graph re-written")
    calib = quantize.calibration_sample(splits, q.calibration_rows, params.project.seed)
    plain: dict[str, Cand] = {}
    for name in q.options:
        opt = quantize.QuantOption.parse(name)
        dst = folder / f"{quant_from.name}+{opt.name}.onnx"
        t1 = time.perf_counter()
        quantize.quantize(quant_from.path, dst, opt, calib if opt.needs_calibration else None)
        agree = quantize.agreement(dst, quant_from.path, splits.X_test)
        cands.append(Cand(dst.stem, opt.name, quant_from.name, dst, n_params,
                          quantize.disagreement(agree, q.min_agreement), {"built_s": time.perf_counter() - t1}))
        plain[opt.name] = cands[-1]
    if quant_from is not cands[0]:  # dynamic INT8 of the unfused graph: what fusion adds to INT8
        opt = quantize.QuantOption.parse("int8-dyn")
        dst = folder / f"{cfg.teacher}+{opt.name}.onnx"
        quantize.quantize(fp32, dst, opt)
        cands.append(Cand(dst.stem, opt.name, cfg.teacher, dst, n_params,
                          quantize.disagreement(quantize.agreement(dst, fp32, splits.X_test), q.min_agreement)))
    aa: dict[str, sensitivity.AccuracyAwareResult] = {}
    weights: dict[str, int] = {}
    if q.accuracy_aware:
        tol = cfg.select.max_drop_vs_teacher
        print(f"\naccuracy-aware INT8 (ottimo.compress.sensitivity, from {quant_from.name}, validation split "
              f"{len(splits.y_val)} rows, tolerance {tol:.2f} points = compress.select.max_drop_vs_teacher, at most "
              f"{q.max_fp32_nodes} FP32 nodes = compress.quantize.max_fp32_nodes):")
        for name in q.options:
            opt = quantize.QuantOption.parse(name)
            dst = folder / f"{quant_from.name}+{opt.name}+aa.onnx"
            t1 = time.perf_counter()
            res = sensitivity.accuracy_aware(quant_from.path, dst, opt, calib if opt.needs_calibration else None,
                                             splits.rows(splits.X_val), splits.y_val, tol,
                                             max_excluded=q.max_fp32_nodes)
            aa[opt.name] = res
            if opt.mode not in weights:  # the nodes the loop could keep in FP32, counted as it counts them
                pre = quantize.preprocess(quant_from.path, folder / "aa-count.pre.onnx", skip_symbolic_shape=True)
                weights[opt.mode] = len(quantize.weight_nodes(pre, opt))
            ranked = weights[opt.mode]
            print(f"  {res.summary} [{time.perf_counter() - t1:.0f} s]")
            print("    rounds: " + "; ".join(f"{len(x.excluded)} FP32 -> val {x.accuracy:.4f} ({x.drop_points:+.2f} "
                                             "pt)" for x in res.rounds))
            for s in res.excluded:
                print(f"    kept FP32: {s.why}")
            if res.excluded:
                error = None
                if not res.success:  # the pipeline disqualifies it; its last round is still timed for the cost
                    quantize.quantize(quant_from.path, dst, opt, calib if opt.needs_calibration else None,
                                      [s.node for s in res.excluded])
                    error = f"accuracy-aware failed: {res.reason}"
                agree = quantize.agreement(dst, quant_from.path, splits.X_test)
                cands.append(Cand(dst.stem, f"{opt.name} (aa)", quant_from.name, dst, n_params,
                                  error or quantize.disagreement(agree, q.min_agreement),
                                  {"fp32_nodes": len(res.excluded), "of_nodes": ranked}))
            elif res.success:
                print(f"    -> {len(res.excluded)} of {ranked} weight nodes kept FP32: the file is plain "
                      f"{quant_from.name}+{opt.name}; not measured twice")
    print(f"\n{len(cands)} ONNX candidates built in {time.perf_counter() - t0:.0f} s")
    for note in notes:
        print("  " + note)

    # 3. accuracy, size on the test split; latency interleaved on every target
    base_metrics = {}
    for c in cands:
        pred = predict(session(c.path), splits.X_test)
        base_metrics[c.name] = {"accuracy": float(accuracy_score(splits.y_test, pred)),
                                "macro_f1": float(f1_score(splits.y_test, pred, average="macro")),
                                "size_mb": c.path.stat().st_size / 1e6}
    with torch.inference_mode():
        eager_pred = teacher(torch.from_numpy(splits.rows(splits.X_test))).argmax(1).numpy()
    eager_acc = float((eager_pred == splits.y_test).mean())
    paths = {c.name: c.path for c in cands}
    X = splits.X_test
    print(f"measuring {len(paths)} candidates interleaved round-robin (ottimo.onnx.latency.measure): " + "; ".join(
        f"{t.name} ({t.threads} thread(s), batch {t.batch}): {warmup[t.name]} warm-up + {rounds[t.name]} rounds"
        for t in targets), flush=True)
    timings: dict[str, dict[str, latency.Timing]] = {}
    for t in targets:
        t1 = time.perf_counter()
        timings[t.name] = latency.measure(paths, X, t, rounds[t.name], warmup[t.name], ev.bootstrap)
        print(f"  {t.name}: {time.perf_counter() - t1:.0f} s", flush=True)
    torch.set_num_threads(deciding.threads)
    eager = latency.Timing.of("PyTorch eager", deciding.name, eager_samples(
        teacher, splits.rows(X), deciding.batch, ev.warmup, rounds[deciding.name]), ev.bootstrap)
    torch.set_num_threads(args.train_threads)
    figs = latency.flatten(timings, targets)
    rows = [pareto.Row(c.name, c.technique, c.base, base_metrics[c.name] | figs[c.name] | {
        "throughput_rps": figs[c.name][f"{max(targets, key=lambda t: t.batch).name}.rows_per_s"]},
        c.parameters, 0.0, error=c.error, settings=c.settings) for c in cands]
    by = {r.name: r for r in rows}
    t_acc = by[cfg.teacher].metrics["accuracy"]
    sel = pareto.select(rows, t_acc, cfg.select, params.gate, None)
    _table(params, cands, rows, timings, targets, sel, eager, eager_acc, aa, plain, quant_from)

    # 4. the selection and the goals
    print(f"\nselection (ottimo.compress.pareto.select, objective {cfg.select.objective} on {deciding.name}, max drop "
          f"{cfg.select.max_drop_vs_teacher} points, floor {cfg.select.min_accuracy}, gate thresholds p95 <= "
          f"{params.gate.max_p95_latency_ms} ms, size <= {params.gate.max_size_mb} MB, accuracy >= "
          f"{params.gate.min_accuracy}): {sel.chosen}")
    for name, why in sel.reasons.items():
        print(f"  {name}: {why}")
    obj_q = cfg.select.objective.removesuffix("_ms") if cfg.select.objective in pareto.LATENCY else "p50"
    tier0 = first_tier(qualifying(rows, t_acc, params), obj_q)
    print(f"  first tier on {obj_q} (statistically tied fastest, latency.tiers): {', '.join(tier0) or '-'}")
    goal_name = sel.chosen
    if sel.chosen is not None and not is_int8(by[sel.chosen].technique):
        int8 = pareto.select([r for r in rows if is_int8(r.technique)], t_acc, cfg.select, params.gate, None)
        print(f"  the selected candidate is not INT8; the goals are checked on the INT8 candidate the same rule "
              f"picks among INT8 ones: {int8.chosen}")
        goal_name = int8.chosen
    _goals(by, timings, deciding, cfg.teacher, goal_name, t_acc)

    # 5. stability: fresh measurements, the same selection
    if args.repeats:
        _stability(params, args, rows, paths, X, deciding, warmup, sel, tier0, t_acc, obj_q, timings, cfg.teacher)


def _table(params, cands, rows, timings, targets, sel, eager, eager_acc, aa, plain, quant_from) -> None:
    cfg, deciding = params.compress, targets[0]
    by = {r.name: r for r in rows}
    t = by[cfg.teacher].metrics
    ref = timings[deciding.name][cfg.teacher]
    print(f"\n{deciding.name} target ({deciding.threads} thread(s), batch {deciding.batch}; deciding): p50/p95 ms "
          "with 95% bootstrap intervals; x FP32 = p50 speed-up vs FP32 onnxruntime, paired bootstrap over the "
          "interleaved rounds; drop = accuracy points below FP32 on the test split")
    head = (f"  {'candidate':38} {'technique':22} {'acc':>6} {'drop':>6} {'p50 ms [95%]':>24} {'p95 ms [95%]':>24} "
            f"{'x FP32 p50 [95%]':>20} {'kB':>7} {'smaller':>7} {'int ops':>7}")
    print(head)
    print("  " + "-" * (len(head) - 2))
    print(f"  {'PyTorch eager (timed alone)':38} {'trained':22} {eager_acc:6.4f} "
          f"{(t['accuracy'] - eager_acc) * 100:6.2f} {_iv(eager.p50):>24} {_iv(eager.p95):>24} "
          f"{_iv(ratio(ref.samples_ms, eager.samples_ms), '.2f'):>20}")
    for c in cands:
        m, tm = by[c.name].metrics, timings[deciding.name][c.name]
        mark = "* " if c.name == sel.chosen else "  "
        print(f"{mark}{c.name:38} {c.technique:22} {m['accuracy']:6.4f} {(t['accuracy'] - m['accuracy']) * 100:6.2f} "
              f"{_iv(tm.p50):>24} {_iv(tm.p95):>24} {_iv(ratio(ref.samples_ms, tm.samples_ms), '.2f'):>20} "
              f"{m['size_mb'] * 1e3:7.1f} {t['size_mb'] / m['size_mb']:7.2f} {quantize.integer_ops(c.path):7d}"
              + (f"  ({c.error})" if c.error else ""))
    for other in targets[1:]:
        ref_o = timings[other.name][cfg.teacher]
        print(f"\n{other.name} target ({other.threads} thread(s), batch {other.batch}): per-call p50/p95 ms, rows/s "
              "from the p50, speed-up vs FP32 onnxruntime")
        print(f"  {'candidate':38} {'p50 ms [95%]':>30} {'p95 ms [95%]':>30} {'rows/s':>8} {'x FP32 p50 [95%]':>20}")
        for c in cands:
            tm = timings[other.name][c.name]
            print(f"  {c.name:38} {_iv(tm.p50, '.2f'):>30} {_iv(tm.p95, '.2f'):>30} "
                  f"{other.batch * 1e3 / tm.p50.point:8,.0f} {_iv(ratio(ref_o.samples_ms, tm.samples_ms), '.2f'):>20}")
    if aa:
        print(f"\naccuracy-aware INT8 ({deciding.name}): FP32 nodes kept and their speed cost against plain INT8")
        for name, res in aa.items():
            c = next((x for x in cands if x.name == f"{quant_from.name}+{name}+aa"), None)
            p = plain[name]
            pm = by[p.name].metrics
            line = (f"  {name}: plain val drop {res.rounds[0].drop_points:+.2f} pt, test "
                    f"{(t['accuracy'] - pm['accuracy']) * 100:+.2f} pt; ")
            if c is None:
                line += ("0 FP32 nodes (plain is within tolerance), no cost" if res.success else
                         f"failed ({res.reason}); measured plain only")
            else:
                line += "" if res.success else "FAILED (disqualified), its last round timed: "
                cm = by[c.name].metrics
                slow = ratio(timings[deciding.name][c.name].samples_ms, timings[deciding.name][p.name].samples_ms)
                line += (f"{c.settings['fp32_nodes']} of {c.settings['of_nodes']} weight nodes FP32 -> val drop "
                         f"{res.rounds[-1].drop_points:+.2f} pt, test "
                         f"{(t['accuracy'] - cm['accuracy']) * 100:+.2f} pt; "
                         f"p50 {_iv(slow, '.2f')}x of plain (>1: slower), size {cm['size_mb'] / pm['size_mb']:.2f}x "
                         "of plain")
            print(line)


def _goals(by, timings, deciding, teacher, name, t_acc) -> None:
    print(f"\ngoals (issue 15) for {name}, against FP32 onnxruntime on {deciding.name}:")
    if name is None:
        print("  [MISSED] no candidate qualifies")
        return
    m, t = by[name].metrics, by[teacher].metrics
    sp = ratio(timings[deciding.name][teacher].samples_ms, timings[deciding.name][name].samples_ms)
    smaller = t["size_mb"] / m["size_mb"]
    drop = (t_acc - m["accuracy"]) * 100
    clear = ("the whole interval clears it" if sp.low >= PROFILE_GOALS["speedup"] else
             "the interval straddles it" if sp.high >= PROFILE_GOALS["speedup"] else "the whole interval is below")
    checks = [(sp.point >= PROFILE_GOALS["speedup"],
               f"p50 {_iv(sp, '.2f')}x faster (goal >= {PROFILE_GOALS['speedup']:.1f}x; {clear}): "
               f"{t['p50_ms']:.3f} -> {m['p50_ms']:.3f} ms"),
              (smaller >= PROFILE_GOALS["smaller"],
               f"{smaller:.2f}x smaller (goal >= {PROFILE_GOALS['smaller']:.1f}x): {t['size_mb'] * 1e3:.0f} -> "
               f"{m['size_mb'] * 1e3:.0f} kB"),
              (drop <= PROFILE_GOALS["drop"] + 1e-9, f"accuracy drop {drop:+.2f} points (goal <= "
               f"{PROFILE_GOALS['drop']:.1f}): {t_acc:.4f} -> {m['accuracy']:.4f}")]
    for ok, text in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")


def _stability(params, args, rows, paths, X, deciding, warmup, sel, tier0, t_acc, q, timings, teacher) -> None:
    ev = params.evaluate
    print(f"\nstability: {args.repeats} fresh measurements on {deciding.name} ({args.stability_rounds} rounds each, "
          f"interleaved), the same selection each time (main run's choice {sel.chosen}; its first tier: "
          f"{', '.join(tier0)})")
    chosen = []
    for k in range(args.repeats):
        fresh = latency.measure(paths, X, deciding, args.stability_rounds, warmup[deciding.name], ev.bootstrap)
        figs = latency.flatten({deciding.name: fresh}, [deciding])
        again = [pareto.Row(r.name, r.technique, r.base, r.metrics | figs[r.name], r.parameters, r.sparsity,
                            error=r.error, settings=r.settings) for r in rows]
        s = pareto.select(again, t_acc, params.compress.select, params.gate, None)
        tier = first_tier(qualifying(again, t_acc, params), q)
        sp = ratio(fresh[teacher].samples_ms, fresh[s.chosen].samples_ms) if s.chosen else None
        chosen.append((s.chosen, tier))
        print(f"  {k + 1:2d}: {s.chosen} (p50 {_iv(fresh[s.chosen].p50) if s.chosen else '-'} ms, "
              f"{_iv(sp, '.2f')}x FP32); first tier: {', '.join(tier)}", flush=True)
    same = sum(c == sel.chosen for c, _ in chosen)
    other = [(c, tier) for c, tier in chosen if c != sel.chosen]
    print(f"  same choice as the main run: {same}/{args.repeats}")
    if other:
        in_main = sum(c in tier0 for c, _ in other)
        main_in = sum(sel.chosen in tier for _, tier in other)
        print(f"  the {len(other)} other choice(s) ({', '.join(sorted({str(c) for c, _ in other}))}): {in_main} of "
              f"them in the main run's first tier (statistically tied with its choice); the main run's choice was in "
              f"that repeat's first tier {main_in} of {len(other)} time(s). Within a tier the rule is deterministic "
              "(accuracy, size, name): a different choice means the tier itself changed with the fresh timings")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", help="a named params profile: params.<name>.yaml at the repo root (e.g. transformer)")
    ap.add_argument("--params", type=Path, help="a params file for the side-by-side profile bench")
    ap.add_argument("--epochs", type=int, default=0, help="train.max_epochs override (0: the profile's)")
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds on batch-1 targets (0: evaluate.runs)")
    ap.add_argument("--server-rounds", type=int, default=20, help="timed rounds on targets with batch > 1")
    ap.add_argument("--repeats", type=int, default=10, help="fresh measurement + selection repeats (stability)")
    ap.add_argument("--stability-rounds", type=int, default=100, help="rounds of each stability measurement")
    ap.add_argument("--train-threads", type=int, default=2, help="torch threads while training")
    args = ap.parse_args(argv)
    if args.profile and args.params:
        ap.error("give --profile or --params, not both")
    if args.profile or args.params:
        path = args.params or REPO / f"params.{args.profile}.yaml"
        if not path.is_file():
            ap.error(f"{path} not found")
        profile_main(path, args)
    else:
        default_main()


if __name__ == "__main__":
    main()
