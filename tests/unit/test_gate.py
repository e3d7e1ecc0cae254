"""The gate's truth table: pass, fail on each threshold, first model with no champion, selection order."""

import pytest

from ottimo.config import GateCfg
from ottimo.registry.gate import Verdict, check, select

CFG = GateCfg(min_accuracy=0.9, max_p95_latency_ms=2.0, max_size_mb=1.0, max_drop_vs_champion=1.0)
GOOD = {"accuracy": 0.95, "p95_ms": 1.0, "size_mb": 0.5}


@pytest.mark.parametrize(
    ("change", "champion", "passed", "failed_reason"),
    [
        ({}, None, True, None),
        ({}, 0.955, True, None),  # 0.5 points worse than the champion: allowed
        ({"accuracy": 0.85}, None, False, "accuracy 0.8500 < min 0.9000"),
        ({"p95_ms": 2.5}, None, False, "p95 latency 2.500 ms > max 2.000 ms"),
        ({"size_mb": 1.2}, None, False, "size 1.200 MB > max 1.000 MB"),
        ({}, 0.97, False, "accuracy drop vs champion 2.00 points"),
        ({"accuracy": 0.9}, None, True, None),  # thresholds are inclusive
        ({"p95_ms": 2.0, "size_mb": 1.0}, 0.91, True, None),
    ],
)
def test_truth_table(change, champion, passed, failed_reason):
    v = check(GOOD | change, CFG, champion)
    assert v.passed is passed
    if failed_reason:
        assert v.reasons[0].startswith(failed_reason)
        assert v.summary.startswith("FAIL")
    else:
        assert v.summary.startswith("PASS")
    assert ("no champion yet" in v.summary) is (champion is None)


def test_every_failed_threshold_is_reported():
    v = check({"accuracy": 0.5, "p95_ms": 9.0, "size_mb": 9.0}, CFG, 0.99)
    assert not v.passed and len([r for r in v.reasons if "<" in r or ">" in r or "drop" in r]) == 4


def test_select_prefers_passing_then_accuracy_then_latency():
    ok, bad = Verdict(True), Verdict(False)
    assert select({"a": (GOOD | {"accuracy": 0.99}, bad), "b": (GOOD, ok)}) == "b"
    assert select({"a": (GOOD | {"accuracy": 0.96}, ok), "b": (GOOD, ok)}) == "a"
    assert select({"a": (GOOD | {"p95_ms": 1.5}, ok), "b": (GOOD, ok)}) == "b"
    assert select({"a": (GOOD | {"accuracy": 0.97}, bad), "b": (GOOD, bad)}) == "a"
