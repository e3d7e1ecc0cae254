"""The latency verdict where decisions are made: the compression selection on 95% intervals, the gate's
"no slower than the champion" rule, the flat figures measured on every target, and the config that names them."""

from __future__ import annotations

import numpy as np
import pytest

from ottimo.compress import pareto
from ottimo.config import ConfigError, EvaluateCfg, GateCfg, SelectCfg, parse_params
from ottimo.onnx import latency
from ottimo.registry import gate


def row(name: str, acc: float, p95: tuple[float, float, float], size: float = 0.1) -> pareto.Row:
    point, low, high = p95
    return pareto.Row(name, "trained", "", {"accuracy": acc, "p95_ms": point, "p95_low_ms": low,
                                            "p95_high_ms": high, "p50_ms": point, "size_mb": size})


@pytest.mark.parametrize(("fast", "slow", "chosen", "word"), [
    ((1.0, 0.9, 1.1), (2.0, 1.9, 2.1), "b", "worse"),  # separated: the faster one, though less accurate
    ((1.0, 0.9, 1.6), (1.5, 1.4, 1.7), "a", "tied"),  # overlapping: a tie, the more accurate one
])
def test_selection_decides_latency_on_intervals(fast, slow, chosen, word):
    rows = [row("a", 0.97, slow), row("b", 0.96, fast)]
    sel = pareto.select(rows, 0.97, SelectCfg())
    assert sel.chosen == chosen, sel.reasons
    loser = ({"a", "b"} - {chosen}).pop()
    assert word in sel.reasons[loser]
    if word == "tied":
        assert "95% intervals overlap" in sel.reasons[chosen]


def test_tied_intervals_of_equal_accuracy_go_to_the_smaller_file_then_the_name():
    rows = [row("z", 0.97, (1.0, 0.8, 1.2), 0.2), row("y", 0.97, (1.1, 0.9, 1.3), 0.1),
            row("x", 0.97, (1.0, 0.8, 1.2), 0.1)]
    assert pareto.select(rows, 0.97, SelectCfg()).chosen == "x"


def test_a_tiny_point_difference_inside_wide_intervals_does_not_decide_even_beyond_the_tolerance():
    # 30% apart at the point (beyond latency_tie_relative 5%), yet the intervals overlap: noise, not a ranking
    rows = [row("fast", 0.95, (1.0, 0.5, 1.5)), row("accurate", 0.97, (1.3, 0.9, 1.8))]
    assert pareto.select(rows, 0.97, SelectCfg()).chosen == "accurate"


def test_without_intervals_the_tolerance_rule_still_applies():
    rows = [pareto.Row("a", "trained", "", {"accuracy": 0.97, "p95_ms": 1.0, "size_mb": 0.1}),
            pareto.Row("b", "trained", "", {"accuracy": 0.96, "p95_ms": 0.5, "size_mb": 0.1})]
    assert pareto.select(rows, 0.97, SelectCfg()).chosen == "b"


def test_the_report_shows_the_interval():
    rows = [row("a", 0.97, (1.0, 0.9, 1.1))]
    sel = pareto.select(rows, 0.97, SelectCfg())
    assert "[0.9000, 1.1000]" in pareto.markdown(rows, sel, "t")
    assert "p95 95% interval" in pareto.html(rows, sel, "t")


METRICS = {"accuracy": 0.95, "p95_ms": 1.0, "size_mb": 0.1}


@pytest.mark.parametrize(("candidate", "champion", "passed"), [
    ((2.0, 1.9, 2.1), (1.0, 0.9, 1.1), False),  # entirely above the champion's: slower, refused
    ((1.05, 0.95, 1.2), (1.0, 0.9, 1.1), True),  # overlapping: a tie, passes
    ((0.5, 0.4, 0.6), (1.0, 0.9, 1.1), True),  # faster
])
def test_the_gate_refuses_a_candidate_entirely_slower_than_the_champion(candidate, champion, passed):
    verdict = gate.check(METRICS, GateCfg(no_slower_than_champion=True), 0.94,  # 1 point better: latency decides
                         latency_rule=gate.no_slower(candidate, champion, "p95 (edge)"))
    assert verdict.passed is passed
    if not passed:
        assert any("slower than the champion" in r and "gate.no_slower_than_champion" in r for r in verdict.failed)


def test_figures_flatten_every_target_and_the_deciding_one_unprefixed(monkeypatch):
    samples = {"edge": [1.0, 1.1, 1.2, 0.9] * 10, "server": [5.0, 5.5, 6.0, 4.5] * 10}

    def fake_measure(paths, X, target, rounds, warmup, n_boot=2000, seed=0):  # the timing is injected, not measured
        return {n: latency.Timing.of(n, target.name, samples[target.name], n_boot, seed) for n in paths}

    monkeypatch.setattr(latency, "measure", fake_measure)
    cfg = EvaluateCfg(targets={"edge": {"threads": 1, "batch": 1}, "server": {"threads": 2, "batch": 64}},
                      target="server", runs=40)
    out = latency.figures({"m": "m.onnx"}, np.zeros((4, 2)), cfg)["m"]
    assert out["p50_ms"] == out["server.p50_ms"] == pytest.approx(np.percentile(samples["server"], 50))
    assert out["edge.p95_ms"] == pytest.approx(np.percentile(samples["edge"], 95))
    assert out["server.rows_per_s"] == pytest.approx(64e3 / out["server.p50_ms"])
    assert latency.interval_of(out) == (out["p95_ms"], out["p95_low_ms"], out["p95_high_ms"])
    assert latency.interval_of(out, "p50", "edge").point == out["edge.p50_ms"]
    assert [t.name for t in latency.targets(cfg)] == ["server", "edge"]


def test_config_names_the_target_and_the_options():
    with pytest.raises(ConfigError, match="evaluate.target 'gpu' is not one of evaluate.targets"):
        parse_params({"evaluate": {"target": "gpu"}})
    with pytest.raises(ConfigError, match="compress.quantize.options: .*unknown quantization option 'int8-fp16'"):
        parse_params({"compress": {"quantize": {"options": ["int8-fp16"]}}})
    with pytest.raises(ConfigError, match="compress.quantize.methods: this setting moved to compress.quantize.options"):
        parse_params({"compress": {"quantize": {"methods": ["dynamic"]}}})
    p = parse_params({"compress": {"quantize": {"options": ["int8-dyn-pc", "int8-qdq-entropy"]}}})
    assert p.compress.quantize.options == ["int8-dyn-pc", "int8-qdq-entropy"]
