"""The latency verdict: bootstrap intervals (seeded, deterministic), the compare truth table on synthetic samples,
the deterministic order of tied candidates, the interleaved call order, and the gate's "no slower" rule."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ottimo.compress import pareto
from ottimo.onnx import latency
from ottimo.onnx.latency import Candidate, Interval, Target, compare, interval, rank, schedule, tiers
from ottimo.registry.gate import no_slower


def samples(mean: float, n: int = 300, sd: float = 0.05, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, sd, n)


# ---- interval ------------------------------------------------------------------------------------------------------

def test_interval_is_deterministic_for_a_seed_and_brackets_the_percentile():
    x = samples(10.0)
    a, b = interval(x, 50, seed=7), interval(x, 50, seed=7)
    assert a == b
    assert interval(x, 50, seed=8) != a  # the seed is what makes it repeatable, not a constant answer
    for q in (50, 95):
        point, low, high = interval(x, q, seed=7)
        assert point == pytest.approx(np.percentile(x, q))
        assert low <= point <= high and high - low > 0


def test_interval_narrows_with_more_samples_and_p95_sits_above_p50():
    wide, narrow = interval(samples(10.0, n=30), 50), interval(samples(10.0, n=3000), 50)
    assert narrow.high - narrow.low < (wide.high - wide.low) / 3
    assert interval(samples(10.0), 95).point > interval(samples(10.0), 50).point


def test_interval_needs_samples():
    with pytest.raises(ValueError, match="at least 2"):
        interval([1.0], 50)


# ---- compare -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b", "verdict"), [
    ((1.0, 0.9, 1.1), (2.0, 1.9, 2.1), "faster"),  # separated, a below
    ((2.0, 1.9, 2.1), (1.0, 0.9, 1.1), "slower"),  # separated, a above
    ((1.0, 0.9, 1.5), (1.2, 1.1, 1.3), "tie"),  # overlapping
    ((1.0, 0.9, 1.1), (1.2, 1.1, 1.3), "tie"),  # touching: not separated
    ((1.0, 0.9, 1.1), (1.0, 0.9, 1.1), "tie"),  # identical
])
def test_compare_truth_table(a, b, verdict):
    assert compare(a, b) == verdict


def test_compare_on_synthetic_samples():
    fast, slow, near = samples(10.0, seed=1), samples(10.5, seed=2), samples(10.002, seed=3)
    p = {k: interval(v, 50) for k, v in {"fast": fast, "slow": slow, "near": near}.items()}
    assert compare(p["fast"], p["slow"]) == "faster" and compare(p["slow"], p["fast"]) == "slower"
    assert compare(p["fast"], p["near"]) == "tie" == compare(p["near"], p["fast"])


# ---- rank ----------------------------------------------------------------------------------------------------------

def cand(name: str, point: float, acc: float = 0.9, size: float = 1.0, half: float = 0.1) -> Candidate:
    return Candidate(name, Interval(point, point - half, point + half), acc, size)


def test_separated_latency_wins_over_accuracy():
    assert [c.name for c in rank([cand("accurate", 5.0, acc=0.99), cand("fast", 1.0, acc=0.90)])] == \
        ["fast", "accurate"]


def test_tied_latency_goes_to_accuracy_then_size_then_name():
    a = cand("a", 1.00, acc=0.90)
    b = cand("b", 1.05, acc=0.95)  # tied with a, more accurate: first though slower on the point
    c = cand("c", 1.02, acc=0.95, size=0.5)  # as accurate as b, smaller: before b
    d = cand("d", 1.02, acc=0.95, size=0.5)  # identical to c but for the name
    order = [x.name for x in rank([a, b, c, d])]
    assert order == ["c", "d", "b", "a"]
    assert order == [x.name for x in rank([d, b, a, c])]  # input order does not matter


def test_tiers_are_anchored_on_the_fastest_remaining():
    # b overlaps a and c, a and c do not overlap: b joins a's tier, c starts the next
    a, b, c = cand("a", 1.0, half=0.1), cand("b", 1.15, half=0.1), cand("c", 1.3, half=0.1)
    assert [[x.name for x in t] for t in tiers([c, b, a])] == [["a", "b"], ["c"]]


def test_rank_is_stable_over_fresh_noise_when_candidates_are_tied():
    """Ten 'measurements' of two equally fast candidates: the point estimates swap, the choice does not."""
    chosen = set()
    for seed in range(10):
        x, y = interval(samples(3.0, seed=seed), 50), interval(samples(3.0, seed=100 + seed), 50)
        chosen.add(rank([Candidate("x", x, 0.90, 1.0), Candidate("y", y, 0.91, 1.0)])[0].name)
    assert chosen == {"y"}


def test_pareto_interval_order_uses_the_same_rule():
    rows = [pareto.Row(n, "t", "", {"accuracy": acc, "size_mb": 1.0}) for n, acc in
            (("slow", 0.99), ("tie_low_acc", 0.90), ("tie_high_acc", 0.92))]
    rows.append(pareto.Row("broken", "t", "", {"accuracy": 1.0, "size_mb": 0.1}, error="failed"))
    lat = {"slow": (9.0, 8.9, 9.1), "tie_low_acc": (1.0, 0.9, 1.2), "tie_high_acc": (1.1, 1.0, 1.2),
           "broken": (0.1, 0.0, 0.2)}
    assert pareto.interval_order(rows, lat) == ["tie_high_acc", "tie_low_acc", "slow"]


# ---- the gate's rule -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("candidate", "champion", "passed", "word"), [
    ((3.0, 2.9, 3.1), (1.0, 0.9, 1.1), False, "slower than"),  # entirely above: refused
    ((1.0, 0.9, 1.1), (3.0, 2.9, 3.1), True, "faster than"),
    ((1.1, 1.0, 1.2), (1.0, 0.9, 1.15), True, "statistically tied"),  # overlapping: a tie passes
    ((1.1, 1.0, 1.2), None, True, "no champion"),
])
def test_no_slower_truth_table(candidate, champion, passed, word):
    ok, reason = no_slower(candidate, champion)
    assert ok is passed and word in reason


# ---- interleaving --------------------------------------------------------------------------------------------------

def test_schedule_rotates_the_order_each_round():
    assert schedule(["a", "b", "c"], 3) == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    order = schedule(["a", "b"], 4)
    assert order.count("a") == order.count("b") == 4


class FakeSession:
    """Records every run call in a shared log, and takes 'a' longer than 'b'."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def get_inputs(self):
        return [SimpleNamespace(shape=["batch", 4], type="tensor(float)")]

    def run(self, outputs, feed):
        self.log.append((self.name, len(next(iter(feed.values())))))


def test_measure_interleaves_candidates_and_feeds_the_target_batch(monkeypatch):
    log: list = []
    monkeypatch.setattr("ottimo.onnx.measure.session", lambda path, threads=1: FakeSession(str(path), log))
    out = latency.measure({"a": "a", "b": "b"}, np.zeros((10, 4)), Target("server", threads=2, batch=3), rounds=5,
                          warmup=2, n_boot=50)
    assert [n for n, _ in log] == schedule(["a", "b"], 7)  # warm-up rounds interleaved too
    assert {b for _, b in log} == {3}
    assert set(out) == {"a", "b"} and all(len(t.samples_ms) == 5 and t.target == "server" for t in out.values())
    m = out["a"].metrics()
    assert m["calls"] == 5 and m["p50_low_ms"] <= m["p50_ms"] <= m["p50_high_ms"] and m["p95_ms"] >= m["p50_ms"]


def test_target_rejects_nonsense():
    with pytest.raises(ValueError, match="threads and batch"):
        Target("edge", threads=0)
