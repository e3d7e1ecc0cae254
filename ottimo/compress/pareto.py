"""Choosing among measured candidates: the selection policy (a pure function), the Pareto front of accuracy
against p95 latency, and the report (PNG, markdown and HTML tables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ottimo.config import GateCfg, SelectCfg
from ottimo.onnx.latency import Candidate, Interval, interval_of, rank, tiers
from ottimo.registry.gate import check

LOWER_IS_BETTER = {"p95_ms": True, "p50_ms": True, "size_mb": True, "throughput_rps": False, "accuracy": False}


@dataclass(frozen=True)
class Row:
    """One measured candidate: what it is, how it was made, and its figures in onnxruntime."""

    name: str
    technique: str  # trained | distill | prune-unstructured | prune-structured | int8-dyn | int8-qdq-minmax
    base: str  # the candidate it was made from ("" for trained models)
    metrics: dict[str, float]  # accuracy, macro_f1, p50_ms, p95_ms, throughput_rps, size_mb
    parameters: int = 0
    sparsity: float = 0.0
    run_id: str = ""
    error: str | None = None  # why it could not be measured (e.g. quantized predictions disagree)
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    chosen: str | None  # None: no candidate qualifies
    objective: str
    reasons: dict[str, str]  # every candidate -> why it was chosen or why it lost

    @property
    def summary(self) -> str:
        if self.chosen is None:
            return "no candidate qualifies: " + "; ".join(f"{k}: {v}" for k, v in self.reasons.items())
        return f"{self.chosen}: {self.reasons[self.chosen]}"


LATENCY = {"p95_ms", "p50_ms"}  # objectives measured with noise: close values tie (SelectCfg.latency_tie_*)


def _disqualified(row: Row, teacher_accuracy: float, cfg: SelectCfg) -> str | None:
    """Why the selection leaves a row out (every `compress.select` floor it misses, each with its setting), or
    None."""
    if row.error:
        return f"failed: {row.error}"
    acc = row.metrics["accuracy"]
    missed = []
    if acc < cfg.min_accuracy:
        missed.append(f"accuracy {acc:.4f} below the floor {cfg.min_accuracy:.4f} (compress.select.min_accuracy)")
    drop = (teacher_accuracy - acc) * 100
    if drop > cfg.max_drop_vs_teacher + 1e-9:
        missed.append(f"{'' if missed else f'accuracy {acc:.4f} is '}{drop:.2f} points below the teacher's "
                      f"{teacher_accuracy:.4f} (max drop {cfg.max_drop_vs_teacher:.2f}, "
                      "compress.select.max_drop_vs_teacher)")
    return "; ".join(missed) or None


def _gate_refuses(row: Row, gate: GateCfg, champion_accuracy: float | None, same_data: bool = True) -> str | None:
    """Why the gate would refuse this candidate (its thresholds and the drop against the champion; model-card
    bounds are measured after the selection, on the registered version), or None."""
    verdict = check(row.metrics, gate.model_copy(update={"card": {}}), champion_accuracy, same_data=same_data)
    return None if verdict.passed else "would fail the gate: " + "; ".join(verdict.failed)


def refusals(row: Row, teacher_accuracy: float, cfg: SelectCfg, gate: GateCfg | None,
             champion_accuracy: float | None, same_data: bool = True) -> str | None:
    """Every threshold that refuses a row the selection leaves out: its `compress.select` floors and, with
    `gate`, the gate's thresholds too, so one run names all the settings to change (not one per run)."""
    why = _disqualified(row, teacher_accuracy, cfg)
    if why is None or row.error or gate is None:
        return why
    also = _gate_refuses(row, gate, champion_accuracy, same_data)
    return why + (f"; it {also.replace('would fail', 'would also fail', 1)}" if also else "")


def tolerance(cfg: SelectCfg, best: float) -> float:
    """How far from the best value a candidate still ties on the objective: latency differences within
    max(latency_tie_ms, latency_tie_relative x best) are measurement noise; other objectives tie only when equal."""
    return max(cfg.latency_tie_ms, cfg.latency_tie_relative * abs(best)) if cfg.objective in LATENCY else 0.0


def select(rows: list[Row], teacher_accuracy: float, cfg: SelectCfg, gate: GateCfg | None = None,
           champion_accuracy: float | None = None, same_data: bool = True) -> Selection:
    """Among rows within `max_drop_vs_teacher` points of the teacher and at or above `min_accuracy`, the best by
    `objective`; every row gets its reason.

    With `gate` (and the champion's accuracy, None when there is none) the rows the gate would pass come first:
    one it would refuse is chosen only when no qualifying row can pass (the gate then fails with its reasons).
    On p50_ms / p95_ms, rows whose 95% latency intervals (p95_low_ms, p95_high_ms: ottimo.onnx.latency.figures)
    overlap the fastest one's tie; without intervals, rows within `tolerance` of the best value do. Ties go to
    higher accuracy, then the smaller file, then the name: a latency difference below the measurement noise does
    not decide."""
    obj, low = cfg.objective, LOWER_IS_BETTER[cfg.objective]
    out = {r.name: refusals(r, teacher_accuracy, cfg, gate, champion_accuracy, same_data) for r in rows}
    ok = [r for r in rows if out[r.name] is None]
    if not ok:
        return Selection(None, obj, {k: str(v) for k, v in out.items()})
    refused = {r.name: _gate_refuses(r, gate, champion_accuracy, same_data) for r in ok} if gate else {}
    pool = [r for r in ok if not refused.get(r.name)] or ok

    def value(r: Row) -> float:
        return r.metrics[obj] if low else -r.metrics[obj]

    intervals = {r.name: interval_of(r.metrics, obj.removesuffix("_ms")) for r in pool} if obj in LATENCY else {}
    if intervals and all(intervals.values()):  # 95% intervals: those overlapping the fastest one's tie
        fastest = [c.name for c in tiers([Candidate(r.name, intervals[r.name], r.metrics["accuracy"],
                                                    r.metrics["size_mb"]) for r in pool])[0]]
        tied = [r for r in pool if r.name in fastest]
        best = next(r for r in pool if r.name == fastest[0])  # a tier is in tie-break order
        within = " (95% intervals overlap)"
    else:
        top = min(value(r) for r in pool)
        tol = tolerance(cfg, top)
        tied = [r for r in pool if value(r) <= top + tol + 1e-12]
        best = min(tied, key=lambda r: (-r.metrics["accuracy"], r.metrics["size_mb"], r.name, value(r)))
        within = f" within {tol:.4g}" if tol else ""
    b = best.metrics[obj]
    vs_champion = "" if not gate else (f", champion {champion_accuracy:.4f}" if champion_accuracy is not None
                                       else ", no champion")
    reasons = {}
    for r in rows:
        v = r.metrics[obj] if out[r.name] is None else None
        if r is best:
            gated = "" if not gate else ("; passes the gate" if not refused.get(r.name) else
                                         f"; no qualifying candidate passes the gate ({refused[r.name]})")
            ties = f"; tied{within} with {len(tied) - 1}, more accurate or smaller" if len(tied) > 1 else ""
            reasons[r.name] = (f"chosen: best {obj} {b:.4g} among {len(pool)} qualifying of {len(rows)} "
                               f"(accuracy {r.metrics['accuracy']:.4f}, teacher {teacher_accuracy:.4f}"
                               f"{vs_champion}){gated}{ties}")
        elif out[r.name] is not None:
            reasons[r.name] = out[r.name]
        elif r not in pool:
            reasons[r.name] = f"qualifies but {refused[r.name]}"
        elif r in tied:
            reasons[r.name] = (f"qualifies but tied on {obj}{within} ({v:.4g} vs {b:.4g} of {best.name}) and "
                               f"less accurate or larger")
        else:
            reasons[r.name] = f"qualifies but worse {obj}: {v:.4g} vs {b:.4g} of {best.name}"
    return Selection(best.name, obj, reasons)


def interval_order(rows: list[Row], latency: dict[str, Interval]) -> list[str]:
    """Names of the rows measured without error that have a latency interval in `latency` (name -> (point, low,
    high) ms, ottimo.onnx.latency.interval), in ottimo.onnx.latency.rank's order: statistically tied latencies
    (overlapping intervals) form one tier, ordered by accuracy (higher), size (smaller), then name; a tier whose
    intervals lie entirely below another's comes first. The first name is the one to choose."""
    cands = [Candidate(r.name, Interval(*latency[r.name]), r.metrics["accuracy"], r.metrics["size_mb"])
             for r in rows if not r.error and r.name in latency]
    return [c.name for c in rank(cands)]


def pareto_front(rows: list[Row]) -> list[str]:
    """Names of rows no other row beats on both accuracy (higher) and p95 latency (lower)."""
    good = [r for r in rows if not r.error]

    def dominated(r: Row) -> bool:
        a, p = r.metrics["accuracy"], r.metrics["p95_ms"]
        return any(o.metrics["accuracy"] >= a and o.metrics["p95_ms"] <= p
                   and (o.metrics["accuracy"] > a or o.metrics["p95_ms"] < p) for o in good)

    return [r.name for r in good if not dominated(r)]


def _ci(metrics: dict[str, float]) -> str:
    iv = interval_of(metrics, "p95")
    return f"[{iv.low:.4f}, {iv.high:.4f}]" if iv else "-"


def table(rows: list[Row], selection: Selection) -> pd.DataFrame:
    front = set(pareto_front(rows))
    recs = []
    for r in rows:
        m = r.metrics
        recs.append({"candidate": r.name, "technique": r.technique, "base": r.base or "-",
                     "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"), "p50_ms": m.get("p50_ms"),
                     "p95_ms": m.get("p95_ms"), "p95_95%_interval": _ci(m), "rows_per_s_b64": m.get("throughput_rps"),
                     "size_kb": m["size_mb"] * 1e3 if "size_mb" in m else None, "parameters": r.parameters,
                     "sparsity": r.sparsity, "pareto": "yes" if r.name in front else "",
                     "selection": selection.reasons.get(r.name, "")})
    return pd.DataFrame(recs)


def markdown(rows: list[Row], selection: Selection, title: str) -> str:
    df = table(rows, selection)
    head = ["candidate", "technique", "accuracy", "p50 ms", "p95 ms", "p95 95% interval", "rows/s @64", "size kB",
            "params", "sparsity", "Pareto", "selection"]
    way = "lowest" if LOWER_IS_BETTER[selection.objective] else "highest"
    lines = [f"# {title}", "", f"**Selected: {selection.chosen or 'none'}** (objective: {way} {selection.objective})",
             ""]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def f(v, fmt: str) -> str:
        return "-" if v is None or v != v else format(v, fmt)

    for _, r in df.iterrows():
        lines.append(f"| {r.candidate} | {r.technique} | {f(r.accuracy, '.4f')} | {f(r.p50_ms, '.4f')} | "
                     f"{f(r.p95_ms, '.4f')} | {r['p95_95%_interval']} | {f(r.rows_per_s_b64, ',.0f')} | "
                     f"{f(r.size_kb, '.1f')} | "
                     f"{r.parameters:,} | {r.sparsity:.2f} | {r.pareto} | {r.selection} |")
    return "\n".join(lines) + "\n"


STYLE = """<style>
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px; color: #1f2933; }
h1 { font-size: 20px; } p { font-size: 14px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 6px 10px; vertical-align: top; }
th { background: #f3f5f7; text-align: left; white-space: nowrap; }
td { white-space: nowrap; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.reason { white-space: normal; min-width: 18em; max-width: 36em; }
tr.chosen td { background: #e6f4ea; font-weight: 600; }
tr:nth-child(even):not(.chosen) td { background: #fafbfc; }
</style>"""


def html(rows: list[Row], selection: Selection, title: str) -> str:
    """The report as a standalone page: a styled table (numbers right-aligned, the selection's reason wrapped in
    a wide last column, the chosen row highlighted)."""
    from html import escape

    df = table(rows, selection)
    head = {"candidate": "candidate", "technique": "technique", "base": "base", "accuracy": "accuracy",
            "macro_f1": "macro F1", "p50_ms": "p50 ms",
            "p95_ms": "p95 ms", "p95_95%_interval": "p95 95% interval", "rows_per_s_b64": "rows/s @64",
            "size_kb": "size kB", "parameters": "params",
            "sparsity": "sparsity", "pareto": "Pareto", "selection": "selection"}
    fmt = {"accuracy": ".4f", "macro_f1": ".4f", "p50_ms": ".4f", "p95_ms": ".4f", "rows_per_s_b64": ",.0f",
           "size_kb": ".1f", "parameters": ",", "sparsity": ".2f"}

    def cell(col: str, v) -> str:
        if col in fmt:
            text = "-" if v is None or v != v else format(v, fmt[col])
            return f"<td class='num'>{text}</td>"
        return f"<td class='{'reason' if col == 'selection' else 'text'}'>{escape(str(v))}</td>"

    cols = [c for c in head if c in df.columns]
    lines = ["<table>", "<thead><tr>" + "".join(f"<th>{head[c]}</th>" for c in cols) + "</tr></thead>", "<tbody>"]
    for _, r in df.iterrows():
        chosen = " class='chosen'" if r.candidate == selection.chosen else ""
        lines.append(f"<tr{chosen}>" + "".join(cell(c, r[c]) for c in cols) + "</tr>")
    lines += ["</tbody>", "</table>"]
    way = "lowest" if LOWER_IS_BETTER[selection.objective] else "highest"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>{STYLE}</head><body>"
            f"<h1>{escape(title)}</h1><p>Selected: <b>{escape(selection.chosen or 'none')}</b> (objective: {way} "
            f"{selection.objective})</p>" + "\n".join(lines) + "</body></html>")


def pareto_png(rows: list[Row], selection: Selection, path: Path) -> Path:
    """Accuracy against p95 latency at batch 1; marker area proportional to file size; the front joined. Each point
    carries a number, and the key beside the plot names it: candidates close together cannot overlap names."""
    good = [r for r in rows if not r.error]
    fig = Figure(figsize=(12, 6))
    ax = fig.add_axes((0.07, 0.1, 0.56, 0.8))
    biggest = max(r.metrics["size_mb"] for r in good) if good else 1.0
    order = sorted(good, key=lambda r: (r.metrics["p95_ms"], -r.metrics["accuracy"]))
    for r in order:
        chosen = r.name == selection.chosen
        ax.scatter(r.metrics["p95_ms"], r.metrics["accuracy"] * 100, s=30 + 600 * r.metrics["size_mb"] / biggest,
                   alpha=0.6, edgecolors="red" if chosen else "black", linewidths=2.5 if chosen else 0.5)
    front = sorted((r for r in good if r.name in set(pareto_front(rows))), key=lambda r: r.metrics["p95_ms"])
    ax.plot([r.metrics["p95_ms"] for r in front], [r.metrics["accuracy"] * 100 for r in front], "k--", lw=0.8,
            label="Pareto front")
    ax.set_xscale("log")
    if good:  # room around the points for their numbers
        xs = [r.metrics["p95_ms"] for r in good]
        ys = [r.metrics["accuracy"] * 100 for r in good]
        ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)
        pad = max(0.5, (max(ys) - min(ys)) * 0.12)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    placed: list[tuple[float, float]] = []  # label positions in pixels: a number close to another moves up
    for i, r in enumerate(order, 1):
        x, y = ax.transData.transform((r.metrics["p95_ms"], r.metrics["accuracy"] * 100))
        dy = 6
        while any(abs(x + 6 - px) < 16 and abs(y + dy - py) < 11 for px, py in placed):
            dy += 11
        placed.append((x + 6, y + dy))
        ax.annotate(str(i), (r.metrics["p95_ms"], r.metrics["accuracy"] * 100), xytext=(6, dy),
                    textcoords="offset points", fontsize=8, fontweight="bold" if r.name == selection.chosen else None,
                    color="red" if r.name == selection.chosen else "black",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if dy > 6 else None)
    key = "\n".join(f"{i:>2}  {r.name}  ({r.metrics['accuracy']:.4f}, {r.metrics['p95_ms']:.4f} ms)"
                     + ("  ← selected" if r.name == selection.chosen else "") for i, r in enumerate(order, 1))
    fig.text(0.65, 0.9, key, va="top", ha="left", family="monospace", fontsize=8)
    ax.set_xlabel("p95 latency at batch 1 (ms, log scale, onnxruntime)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Compression candidates (marker size = file size); selected: {selection.chosen or 'none'}",
                 fontsize=10)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100)
    return path
