"""A model card as markdown: the full page (card.md) and a compact one that fits a registry description.

MLflow renders a model version's description as markdown; its column holds 5,000 characters, so the compact
page leaves out the confusion-matrix table and the longer lists (they stay in card.md and card.json).
"""

from __future__ import annotations

from ottimo.card.sections import KINDS, SECTIONS, ModelCard

DESCRIPTION_LIMIT = 5000


def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _accuracy(s: dict, full: bool) -> list[str]:
    out = [f"Test split, {s['rows']} rows: **accuracy {_f(s['accuracy'])}**, **macro-F1 {_f(s['macro_f1'])}**.", ""]
    out += _table(["class", "precision", "recall", "F1", "support"],
                  [[str(c["label"]), _f(c["precision"], 3), _f(c["recall"], 3), _f(c["f1"], 3), str(c["support"])]
                   for c in s["per_class"]])
    labels = [str(c["label"]) for c in s["per_class"]]
    if full:
        out += ["", "Confusion matrix (rows: true class, columns: predicted):", ""]
        out += _table(["true \\ pred", *labels], [[lab, *map(str, row)] for lab, row in
                                                 zip(labels, s["confusion_matrix"], strict=True)])
    else:
        out += ["", "Confusion matrix: `card/confusion_matrix.png` and `card/card.json`."]
    return out


def _robustness(s: dict, full: bool) -> list[str]:
    kinds = list(s["curves"]) or list(KINDS)  # the input kind's perturbations (sections.INPUT_KINDS)
    out = _table(["severity", *kinds], [[f"{sev:g}", *(_f(s["curves"][k][i], 3) for k in kinds)]
                                        for i, sev in enumerate(s["severities"])])
    means = ", ".join(f"{k} **{_f(s[k], 3)}**" for k in kinds)
    out += ["", f"Mean accuracy over the non-zero severities: {means} (seed {s['seed']}). Curve: "
            "`card/robustness.png`."]
    return out + ["", *(f"- {k}: {s['method'][k]}" for k in kinds)] if full else out


def _generalisation(s: dict, full: bool = True) -> list[str]:
    out = _table(["train", "val", "test", "train − test gap", "train − val gap"],
                 [[_f(s["train_accuracy"]), _f(s["val_accuracy"]), _f(s["test_accuracy"]),
                   _f(s["train_test_gap"]), _f(s["train_val_gap"])]])
    out += ["", f"Accuracy under mild drift: **{_f(s.get('drift_accuracy'))}**: {s['drift_note']}."]
    curves = s.get("drift_curves") or {}
    if curves and full:  # the per-shift table is card.md's; the registry description keeps the mean (its 5,000 chars)
        sevs = s["drift_severities"]
        out += ["", *_table(["shift", *(f"severity {x:g}" for x in sevs)],
                            [[k, *(_f(a, 3) for a in c)] for k, c in curves.items()])]
        out += ["", *(f"- {k}: {s['drift_method'][k]}" for k in curves)]
    if s.get("drift_skipped"):
        out += ["", f"Not measured: {', '.join(s['drift_skipped'])} (image kinds need image rows or a matching "
                "card.image_shape; token sequences take none of them)."]
    return out


def _fairness(s: dict) -> list[str]:
    out = [f"Per-class recall: spread (max − min) **{_f(s['recall_spread'], 3)}**, lowest "
           f"**{_f(s['min_class_recall'], 3)}** for class {s['worst_class']}.", ""]
    if s["slices"]:
        out += [f"Accuracy per slice of the test split (slices under {s['min_slice_rows']} rows are listed, "
                "not compared):", ""]
        out += _table(["column", "slice", "rows", "accuracy"],
                      [[f"`{c['column']}`", r["slice"], str(r["rows"]), _f(r["accuracy"], 3)]
                       for c in s["slices"] for r in c["slices"]])
        big = s["largest_gap"]
        out += ["", f"Largest gap between slices: **{_f(big['gap'], 3)}** on `{big['column']}` (best {big['best']}, "
                f"worst {big['worst']})." if big else "Largest gap between slices: – (fewer than two slices large "
                "enough to compare)."]
    else:
        out.append("No slice columns configured (`card.slices` in params.yaml).")
    out += [f"- skipped `{k['column']}`: {k['reason']}" for k in s["skipped"]]
    return out


def _interpretability(s: dict, full: bool) -> list[str]:
    out = [f"{s['method']}; {s['rows']} test rows x {s['repeats']} repeats, seed {s['seed']}. "
           f"Share of importance in the top 5 features: {_f(s['top5_share'], 3)}.", ""]
    top = s["top"] if full else s["top"][:5]
    out += _table(["feature", "accuracy drop", "± std"],
                  [[f"`{t['feature']}`", _f(t["importance"]), _f(t["std"])] for t in top])
    shape = s["image_shape"]
    out.append("")
    out.append(f"Heat-map ({'x'.join(map(str, shape[-2:]))}): `card/importance.png`." if shape else
               f"Bar chart: `card/importance.png`.{' ' + s['image_note'] if s['image_note'] else ''}")
    return out


def _lineage(s: dict, full: bool) -> list[str]:
    gate = s.get("gate", {})
    params = s.get("params", {})
    shown = params if full else {k: v for k, v in list(params.items())[:12]}
    return [
        f"- data revision (DVC md5 of data/prepared): `{s.get('data_revision')}`",
        f"- code commit: `{s.get('code_commit')}`",
        f"- training run: `{s.get('run_id')}` (pipeline run `{s.get('parent_run_id')}`)",
        f"- parent teacher: {s.get('teacher') or 'none tagged'}",
        f"- ONNX sha256: `{s.get('sha256')}`",
        f"- gate verdict: **{gate.get('verdict')}**: {'; '.join(gate.get('reasons', [])) or '–'}",
        *(["- gate thresholds: " + (", ".join(f"{k}={v}" for k, v in gate.get("thresholds", {}).items()) or "–")]
          if full else []),  # the compact card: each reason names its setting and value already
        "- training params: " + (", ".join(f"{k}={v}" for k, v in shown.items()) or "–")
        + (" …" if len(shown) < len(params) else ""),
    ]


def _scalability(s: dict, full: bool) -> list[str]:
    out = [f"Latency at batch 1 ({s['latency_threads']} thread, {s['latency_runs']} runs): p50 "
           f"**{_f(s['p50_ms'], 3)} ms**, p95 **{_f(s['p95_ms'], 3)} ms**.", ""]
    out += _table(["batch", "rows/s", "CPU-s per 1M rows", f"cost per 1M rows ({s['currency']})"],
                  [[str(c["batch"]), f"{c['rows_per_s']:,.0f}", _g(c["cpu_s_per_million"]),
                    _g(c["cost_per_million"])] for c in s["curve"]])
    if full and s.get("targets"):  # the full card only (the registry description is short); older cards have none
        out += ["", "Per call on each target (evaluate.targets; 95% bootstrap intervals; * decides the gate):", ""]
        out += _table(["target", "threads", "rows per call", "p50 ms", "p95 ms"],
                      [[t["target"] + (" *" if t["decides"] else ""), str(t["threads"]), str(t["batch"]),
                        f"{_f(t['p50_ms'], 3)} [{_f(t['p50_low_ms'], 3)}, {_f(t['p50_high_ms'], 3)}]",
                        f"{_f(t['p95_ms'], 3)} [{_f(t['p95_low_ms'], 3)}, {_f(t['p95_high_ms'], 3)}]"]
                       for t in s["targets"]])
    m = s["machine"]
    out += ["", f"At batch 1: **{_g(s['cpu_s_per_million'])} CPU-seconds per million predictions**, about "
            f"**{_g(s['cost_per_million'])} {s['currency']}** per million at {s['price_per_cpu_hour']:g} "
            f"{s['currency']} per CPU-hour. Peak throughput {s['max_throughput_rps']:,.0f} rows/s "
            f"({s['throughput_threads']} thread(s)); machine: {m['cpus']} CPUs, onnxruntime {m['onnxruntime']}. "
            "Curve: `card/throughput.png`."]
    return out + ["", f"CPU timer: {s['cpu_timer']}; processor {m['processor']}."] if full else out


def _schema(values: list[dict]) -> str:
    return ", ".join(f"`{v['name']}` {v['dtype']} [{', '.join(map(str, v['shape']))}]" for v in values)


def _classes(s: dict, full: bool) -> list[str]:
    """The classes in output order, and what the ONNX file's metadata says when it says something else."""
    classes, in_file = s.get("classes"), s.get("classes_in_file")
    if classes is None:
        return []
    where = ("as in the ONNX file" + (" (metadata `ottimo.classes`)" if full else "") if in_file == classes else
             "the ONNX file carries no class list" if in_file is None else
             f"**the ONNX file's metadata says {in_file}**")
    shown = classes if full or len(classes) <= 20 else [*classes[:20], f"… {len(classes) - 20} more"]
    return [f"- classes, in output order: {shown}, {where}"]


def _deployment(s: dict, full: bool) -> list[str]:
    ops = ", ".join(f"{op}×{n}" for op, n in s["operators"].items())
    ok = "**yes**" if s["single_thread_ok"] else "**no**"
    return [
        f"- ONNX opset {s['opset']} (IR {s['ir_version']}); {len(s['operators'])} operator types: {ops}",
        f"- file size: {_f(s['size_mb'], 3)} MB ({s['size_bytes']:,} bytes)",
        f"- input: {_schema(s['inputs'])}; output: {_schema(s['outputs'])}",
        *_classes(s, full),
        f"- peak memory of an inference session: +{_f(s['peak_memory_mb'], 1)} MB (peak RSS "
        f"{_f(s['peak_rss_mb'], 1)} MB, batch {s['memory_batch']}"
        + (f"; {s['memory_method']})" if full else "; see card.md for how)"),
        f"- runs with 1 thread within the gate's latency threshold: {ok} (p95 {_f(s['single_thread_p95_ms'], 3)} ms "
        f"vs max {s['max_p95_latency_ms']:g} ms)",
    ]


def render(card: ModelCard, full: bool = True) -> str:
    """The card as markdown, one `## N. Dimension` heading per section; `full=False` for a registry description."""
    lin = card.lineage
    head = [f"# Model card: {lin.get('model', 'model')} v{lin.get('version', '?')} ({lin.get('family', '?')})", "",
            f"Measured {card.computed_at} from the registered ONNX file and data revision "
            f"`{str(lin.get('data_revision'))[:12]}`. Figures and plots: artifacts `card/` of run "
            f"`{lin.get('run_id')}` ({', '.join(['card.json', 'card.md', *card.plots])})."]
    body = {
        "accuracy": _accuracy(card.accuracy, full), "robustness": _robustness(card.robustness, full),
        "generalisation": _generalisation(card.generalisation, full), "fairness": _fairness(card.fairness),
        "interpretability": _interpretability(card.interpretability, full), "lineage": _lineage(lin, full),
        "scalability": _scalability(card.scalability, full), "deployment": _deployment(card.deployment, full),
    }
    lines = head
    for key, title in SECTIONS.items():
        lines += ["", f"## {title}", "", *body[key]]
    return "\n".join(lines) + "\n"


PAD = "&nbsp;"  # MLflow's markdown (showdown) draws table cells with no padding: numbers run together


def spaced(md: str) -> str:
    """Markdown tables with their header cells padded by non-breaking spaces: MLflow renders tables without cell
    padding, and a wider header spaces every row of its column (padding every cell would cost the description
    its last sections). Other lines unchanged."""
    lines = md.split("\n")
    out = []
    for i, line in enumerate(lines):
        header = i + 1 < len(lines) and lines[i + 1].startswith("|---")
        if header and line.startswith("| ") and line.endswith(" |"):
            line = "| " + " | ".join(f"{PAD}{c}{PAD}" for c in line[2:-2].split(" | ")) + " |"
        out.append(line)
    return "\n".join(out)


def description(card: ModelCard, limit: int = DESCRIPTION_LIMIT) -> str:
    """The compact card with spaced tables, cut to `limit` characters if it is still longer (the full one is
    card.md)."""
    md = spaced(render(card, full=False))
    if len(md) <= limit:
        return md
    note = "\n\n… (cut to fit the registry; the full card is `card/card.md`)\n"
    return md[: limit - len(note)] + note
