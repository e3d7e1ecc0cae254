"""The promotion gate: accuracy *and* latency *and* size, and no regression against the champion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ottimo.config import GateCfg
from ottimo.onnx.latency import Interval, compare


class GateFailed(RuntimeError):
    """No candidate met the thresholds; the registry's champion aliases were left as they were."""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one line per threshold, failed ones first
    failed: list[str] = field(default_factory=list)  # the thresholds that were not met

    @property
    def summary(self) -> str:
        return ("PASS" if self.passed else "FAIL") + ": " + "; ".join(self.reasons)

    @property
    def short(self) -> str:
        return "PASS" if self.passed else "FAIL: " + "; ".join(self.failed)


def check(metrics: dict[str, float], cfg: GateCfg, champion_accuracy: float | None,
          card: dict[str, float] | None = None, latency_rule: tuple[bool, str] | None = None,
          same_data: bool = True) -> Verdict:
    """Apply every threshold to one candidate's metrics (accuracy in [0, 1], latency in ms, size in MB),
    and `gate.card` bounds to its model-card figures (ottimo.card.sections.ModelCard.figures()). Every rule is
    checked (a refusal lists all the thresholds missed, not the first) and names its setting in params.yaml.
    `latency_rule`: `no_slower`'s verdict against the champion (gate.no_slower_than_champion), one rule more.
    `same_data`: the candidate was trained on the champion's data revision, so it must beat the champion by
    gate.min_gain points; on another revision it may trail it by gate.max_drop_vs_champion points instead."""
    acc, p95, size = metrics["accuracy"], metrics["p95_ms"], metrics["size_mb"]
    rules = [
        (acc >= cfg.min_accuracy, f"accuracy {acc:.4f} {'>=' if acc >= cfg.min_accuracy else '<'} "
         f"min {cfg.min_accuracy:.4f} (gate.min_accuracy)"),
        (p95 <= cfg.max_p95_latency_ms, f"p95 latency {p95:.3f} ms {'<=' if p95 <= cfg.max_p95_latency_ms else '>'} "
         f"max {cfg.max_p95_latency_ms:.3f} ms (gate.max_p95_latency_ms)"),
        (size <= cfg.max_size_mb, f"size {size:.3f} MB {'<=' if size <= cfg.max_size_mb else '>'} "
         f"max {cfg.max_size_mb:.3f} MB (gate.max_size_mb)"),
    ]
    if champion_accuracy is None:
        rules.append((True, "no champion yet: first model"))
    else:
        rules.append(versus_champion(acc, champion_accuracy, cfg, same_data))
    if latency_rule is not None:
        rules.append((latency_rule[0], latency_rule[1] + " (gate.no_slower_than_champion)"))
    rules += card_rules(cfg, card or {})
    failed = [r for ok, r in rules if not ok]
    passed = [r for ok, r in rules if ok]
    return Verdict(passed=not failed, reasons=failed + passed, failed=failed)


def versus_champion(acc: float, champion: float, cfg: GateCfg, same_data: bool) -> tuple[bool, str]:
    """The rule against the champion's accuracy (on this run's test split), in points: on the champion's own data
    revision the candidate must gain at least gate.min_gain (a retrain of the same thing does not displace it);
    trained on another revision it may lose at most gate.max_drop_vs_champion."""
    gain = (acc - champion) * 100
    moved = (f"accuracy {'gain' if gain >= 0 else 'drop'} vs champion {abs(gain):.2f} points "
             f"({acc:.4f} vs {champion:.4f}")
    if same_data:
        ok = gain >= cfg.min_gain - 1e-9  # float error does not decide: (0.9007 - 0.8957) * 100 is 0.49999...
        return ok, (f"{moved}, same data revision; min gain {cfg.min_gain:.2f}, gate.min_gain)" + (
            "" if ok else ": the champion stays; beat it by gate.min_gain points, or train on new data"))
    ok = -gain <= cfg.max_drop_vs_champion + 1e-9
    return ok, (f"{moved}; max drop {cfg.max_drop_vs_champion:.2f}, gate.max_drop_vs_champion; new data revision, "
                "so gate.min_gain does not apply)")


def card_rules(cfg: GateCfg, figures: dict[str, float]) -> list[tuple[bool, str]]:
    """One rule per `gate.card` bound; a figure the card did not measure (missing or NaN) fails."""
    rules: list[tuple[bool, str]] = []
    for name, bound in cfg.card.items():
        value = figures.get(name)
        if value is None or value != value:
            rules.append((False, f"card {name} not measured (no model card, or nothing to measure it on; "
                          f"gate.card.{name})"))
            continue
        if bound.min is not None:
            ok = value >= bound.min
            rules.append((ok, f"card {name} {value:.4g} {'>=' if ok else '<'} min {bound.min:.4g} "
                          f"(gate.card.{name}.min)"))
        if bound.max is not None:
            ok = value <= bound.max
            rules.append((ok, f"card {name} {value:.4g} {'<=' if ok else '>'} max {bound.max:.4g} "
                          f"(gate.card.{name}.max)"))
    return rules


def no_slower(candidate: Sequence[float], champion: Sequence[float] | None, metric: str = "p95") -> tuple[bool, str]:
    """The "no slower than the champion" rule on latency intervals (point, low, high) in ms, as
    ottimo.onnx.latency.interval gives them: refused only when the candidate's interval lies entirely above the
    champion's (latency.compare says "slower"); overlapping intervals are a tie and pass. No champion: passes.
    Returns (passed, reason), a rule line like `check`'s."""
    if champion is None:
        return True, f"{metric} latency: no champion to compare with"
    c, h = Interval(*candidate), Interval(*champion)
    verdict = compare(c, h)
    word = {"slower": "slower than", "faster": "faster than", "tie": "statistically tied with"}[verdict]
    return verdict != "slower", f"{metric} latency {c} ms {word} the champion's {h} ms (95% intervals)"


def select(candidates: dict[str, tuple[dict[str, float], Verdict]]) -> str:
    """The candidate to hand on: passing before failing, then highest accuracy, then lowest p95 latency."""
    return min(
        candidates,
        key=lambda k: (not candidates[k][1].passed, -candidates[k][0]["accuracy"], candidates[k][0]["p95_ms"]),
    )
