"""A latency verdict that noise cannot flip: candidates measured interleaved, percentiles with bootstrap intervals,
"faster" only when the intervals separate, and a deterministic order among the statistically tied.

- `measure(paths, X, target, rounds)`: one session per candidate (the target's threads), then `rounds` rounds; each
  round times one call of every candidate, in an order rotated by one each round (`schedule`), so drift in the
  machine's load (other processes, frequency scaling) falls on every candidate alike. Per-call samples in ms.
- `interval(samples, q)`: the q-th percentile and its bootstrap 95% interval (seeded: the same samples give the
  same interval).
- `compare(a, b)`: "faster" when a's interval lies entirely below b's, "slower" when entirely above, else "tie".
- `rank(candidates)`: tiers of statistically tied latency, fastest tier first; within a tier by accuracy (higher),
  size (smaller), then name.

Pure except `measure` / `measure_targets`, which run onnxruntime.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

Verdict = Literal["faster", "slower", "tie"]


@dataclass(frozen=True)
class Target:
    """Where a model will run, as measurement settings: intra-op `threads` and rows per call (`batch`)."""

    name: str
    threads: int = 1
    batch: int = 1

    def __post_init__(self) -> None:
        if self.threads < 1 or self.batch < 1:
            raise ValueError(f"target {self.name!r}: threads and batch must be >= 1 (got {self.threads}, {self.batch})")


class Interval(NamedTuple):
    """A percentile's point estimate and its bootstrap confidence interval, in ms; unpacks as (point, low, high)."""

    point: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.point:.3f} [{self.low:.3f}, {self.high:.3f}]"


def interval(samples: Sequence[float] | np.ndarray, q: float = 50.0, n_boot: int = 2000, seed: int = 0,
             level: float = 0.95) -> Interval:
    """The q-th percentile of `samples` and the percentile-bootstrap `level` interval around it: `n_boot`
    resamples with replacement (numpy default_rng(seed)), the interval their q-th percentiles span between the
    (1 - level)/2 and (1 + level)/2 quantiles. Deterministic for a given seed."""
    x = np.asarray(samples, dtype=float)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need at least 2 timing samples for an interval, got {x.size}; measure more rounds")
    rng = np.random.default_rng(seed)
    boots = np.percentile(x[rng.integers(0, len(x), size=(n_boot, len(x)))], q, axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(np.percentile(x, q)), float(lo), float(hi))


def compare(a: Interval | Sequence[float], b: Interval | Sequence[float]) -> Verdict:
    """a against b: "faster" when a's interval lies entirely below b's (a.high < b.low), "slower" when entirely
    above (a.low > b.high), otherwise "tie" (the intervals overlap or touch)."""
    a, b = Interval(*a), Interval(*b)
    if a.high < b.low:
        return "faster"
    if a.low > b.high:
        return "slower"
    return "tie"


@dataclass(frozen=True)
class Candidate:
    """What `rank` orders: a name, its latency interval (p50 or p95, whichever decides), accuracy, size."""

    name: str
    latency: Interval
    accuracy: float
    size_mb: float


def _tiebreak(c: Candidate) -> tuple:
    return (-c.accuracy, c.size_mb, c.name)


def tiers(candidates: Sequence[Candidate]) -> list[list[Candidate]]:
    """Candidates grouped by statistically tied latency, fastest first. The fastest remaining candidate (lowest
    point estimate, then name) anchors a tier; every remaining candidate not slower than it joins. Within a tier:
    accuracy (higher), size (smaller), name."""
    left = sorted(candidates, key=lambda c: (c.latency.point, c.name))
    out = []
    while left:
        anchor = left[0]
        tier = [c for c in left if compare(c.latency, anchor.latency) != "slower"]
        out.append(sorted(tier, key=_tiebreak))
        taken = {id(c) for c in tier}
        left = [c for c in left if id(c) not in taken]
    return out


def rank(candidates: Sequence[Candidate]) -> list[Candidate]:
    """All candidates in one deterministic order: `tiers` flattened. The first is the one to choose."""
    return [c for tier in tiers(candidates) for c in tier]


# ---- measurement --------------------------------------------------------------------------------------------------

def schedule(names: Sequence[str], rounds: int) -> list[str]:
    """The order candidates are called in: round r calls every name once, starting at name r mod n (a rotation),
    so no candidate is always first after the others (cache and frequency effects fall on all alike)."""
    n = len(names)
    return [names[(r + i) % n] for r in range(rounds) for i in range(n)]


@dataclass(frozen=True)
class Timing:
    """One candidate's per-call samples (ms) on one target, and its p50 / p95 intervals."""

    candidate: str
    target: str
    samples_ms: tuple[float, ...]
    p50: Interval
    p95: Interval

    def metrics(self) -> dict[str, float]:
        """Flat figures for MLflow / the report: p50_ms, p50_low_ms, p50_high_ms, the same for p95, and calls."""
        out = {"calls": float(len(self.samples_ms))}
        for q, iv in (("p50", self.p50), ("p95", self.p95)):
            out |= {f"{q}_ms": iv.point, f"{q}_low_ms": iv.low, f"{q}_high_ms": iv.high}
        return out

    @classmethod
    def of(cls, candidate: str, target: str, samples: Sequence[float], n_boot: int = 2000, seed: int = 0) -> Timing:
        return cls(candidate, target, tuple(float(s) for s in samples), interval(samples, 50, n_boot, seed),
                   interval(samples, 95, n_boot, seed))


def _batch(sess, X: np.ndarray, batch: int, k: int) -> np.ndarray:
    from ottimo.onnx.export import shaped

    rows = shaped(sess, X)
    return rows[(np.arange(batch) + k * batch) % len(rows)]


def measure(paths: Mapping[str, Path], X: np.ndarray, target: Target, rounds: int = 200, warmup: int = 10,
            n_boot: int = 2000, seed: int = 0) -> dict[str, Timing]:
    """Time every candidate file on `target`, interleaved (see `schedule`): `warmup` untimed rounds, then `rounds`
    timed ones; each call runs `target.batch` rows of X (flat or shaped rows, cycled, the same rows for every
    candidate in a round). Returns name -> Timing (per-call ms)."""
    from ottimo.onnx.export import INPUT, OUTPUT
    from ottimo.onnx.measure import session

    names = list(paths)
    sessions = {n: session(Path(paths[n]), target.threads) for n in names}
    feeds = {n: [_batch(sessions[n], X, target.batch, k) for k in range(8)] for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i, name in enumerate(schedule(names, warmup + rounds)):
        r = i // len(names)
        feed = {INPUT: feeds[name][r % 8]}
        t0 = time.perf_counter_ns()
        sessions[name].run([OUTPUT], feed)
        if r >= warmup:
            samples[name].append((time.perf_counter_ns() - t0) / 1e6)
    return {n: Timing.of(n, target.name, samples[n], n_boot, seed) for n in names}


def targets(cfg) -> list[Target]:
    """`evaluate.targets` (an EvaluateCfg) as Targets, the deciding one (`evaluate.target`) first."""
    order = [cfg.target] + [n for n in cfg.targets if n != cfg.target]
    return [Target(n, cfg.targets[n].threads, cfg.targets[n].batch) for n in order]


def figures(paths: Mapping[str, Path], X: np.ndarray, cfg) -> dict[str, dict[str, float]]:
    """Every file timed interleaved on every target of `cfg` (an EvaluateCfg: targets, runs, warmup, bootstrap), as
    `flatten` writes the timings."""
    ts = targets(cfg)
    return flatten(measure_targets(paths, X, ts, cfg.runs, cfg.warmup, cfg.bootstrap), ts)


def flatten(timings: Mapping[str, Mapping[str, Timing]], targets: Sequence[Target]) -> dict[str, dict[str, float]]:
    """Timings (target name -> candidate -> Timing; `targets` the deciding one first) as flat figures per candidate:
    the deciding target's p50_ms, p95_ms and their 95% interval ends (p50_low_ms, ...) unprefixed; every target's,
    the deciding one's included, also under "<target>." (edge.p50_ms, server.p95_high_ms, ...), with
    <target>.rows_per_s (rows per second at the target's batch, from its p50)."""
    out: dict[str, dict[str, float]] = {}
    for i, t in enumerate(targets):
        for name, timing in timings.get(t.name, {}).items():
            m, d = {k: v for k, v in timing.metrics().items() if k != "calls"}, out.setdefault(name, {})
            if i == 0:
                d |= m
            d |= {f"{t.name}.{k}": v for k, v in m.items()}
            d[f"{t.name}.rows_per_s"] = t.batch * 1e3 / m["p50_ms"]
    return out


def interval_of(metrics: Mapping[str, float], q: str = "p95", target: str | None = None) -> Interval | None:
    """The (point, low, high) interval of percentile `q` in flat `figures` (the deciding target's, or `target`'s),
    or None when they hold none."""
    pre = f"{target}." if target else ""
    keys = (f"{pre}{q}_ms", f"{pre}{q}_low_ms", f"{pre}{q}_high_ms")
    return Interval(*(float(metrics[k]) for k in keys)) if all(k in metrics for k in keys) else None


def measure_targets(paths: Mapping[str, Path], X: np.ndarray, targets: Sequence[Target], rounds: int = 200,
                    warmup: int = 10, n_boot: int = 2000, seed: int = 0) -> dict[str, dict[str, Timing]]:
    """`measure` on each target in turn (candidates interleaved within a target): target name -> name -> Timing."""
    return {t.name: measure(paths, X, t, rounds, warmup, n_boot, seed) for t in targets}
