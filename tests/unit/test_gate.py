"""The gate's truth table: pass, fail on each threshold, first model with no champion, the champion rule on the
same data revision (gate.min_gain) and on a new one (gate.max_drop_vs_champion), selection order."""

import pytest

from ottimo.config import GateCfg
from ottimo.registry.gate import Verdict, check, select

CFG = GateCfg(min_accuracy=0.9, max_p95_latency_ms=2.0, max_size_mb=1.0, max_drop_vs_champion=1.0, min_gain=0.5)
GOOD = {"accuracy": 0.95, "p95_ms": 1.0, "size_mb": 0.5}
SAME, NEW = True, False  # the candidate's data revision is the champion's / another one


@pytest.mark.parametrize(
    ("change", "champion", "data", "passed", "failed_reason"),
    [
        ({}, None, SAME, True, None),
        ({}, 0.955, NEW, True, None),  # new data: 0.5 points worse than the champion is allowed
        ({}, 0.97, NEW, False, "accuracy drop vs champion 2.00 points"),
        ({"accuracy": 0.85}, None, SAME, False, "accuracy 0.8500 < min 0.9000"),
        ({"p95_ms": 2.5}, None, SAME, False, "p95 latency 2.500 ms > max 2.000 ms"),
        ({"size_mb": 1.2}, None, SAME, False, "size 1.200 MB > max 1.000 MB"),
        ({"accuracy": 0.9}, None, SAME, True, None),  # thresholds are inclusive
        ({"p95_ms": 2.0, "size_mb": 1.0}, 0.91, NEW, True, None),
        # same data: the candidate must beat the champion by min_gain points
        ({}, 0.95, SAME, False, "accuracy gain vs champion 0.00 points"),  # a retrain of the same thing
        ({}, 0.955, SAME, False, "accuracy drop vs champion 0.50 points"),  # worse: within max_drop, still refused
        ({}, 0.946, SAME, False, "accuracy gain vs champion 0.40 points"),  # better, but by less than min_gain
        ({}, 0.945, SAME, True, None),  # exactly min_gain: inclusive
        ({"accuracy": 0.9007}, 0.8957, SAME, True, None),  # also when floats make it 0.49999...
        ({"accuracy": 0.99}, 0.95, SAME, True, None),
    ],
)
def test_truth_table(change, champion, data, passed, failed_reason):
    v = check(GOOD | change, CFG, champion, same_data=data)
    assert v.passed is passed
    if failed_reason:
        assert v.reasons[0].startswith(failed_reason), v.reasons
        assert v.summary.startswith("FAIL")
    else:
        assert v.summary.startswith("PASS")
    assert ("no champion yet" in v.summary) is (champion is None)


# the nightly runs on unchanged data: 0.9815 must not displace 0.9889, nor 0.9815 displace 0.9815
@pytest.mark.parametrize(("candidate", "champion", "min_gain", "passed"), [
    (0.9815, 0.9889, 0.5, False), (0.9815, 0.9815, 0.5, False), (0.9815, 0.9815, 0.0, True),
    (0.9889, 0.9815, 0.5, True), (0.9852, 0.9815, 0.5, False), (0.9815, 0.9889, -1.0, True),  # negative: may trail
])
def test_min_gain_on_the_champions_data_revision(candidate, champion, min_gain, passed):
    cfg = CFG.model_copy(update={"min_gain": min_gain})
    v = check(GOOD | {"accuracy": candidate}, cfg, champion, same_data=True)
    assert v.passed is passed
    [rule] = [r for r in v.reasons if "vs champion" in r]
    assert f"min gain {min_gain:.2f}, gate.min_gain" in rule and "max_drop" not in rule
    assert ("the champion stays" in rule) is (not passed)


def test_a_new_data_revision_is_not_held_to_min_gain_but_to_max_drop():
    strict = CFG.model_copy(update={"min_gain": 5.0})  # no retrain on the same data could pass this
    v = check(GOOD, strict, 0.955, same_data=False)
    assert v.passed, v.reasons
    [rule] = [r for r in v.reasons if "vs champion" in r]
    assert "gate.max_drop_vs_champion" in rule and "gate.min_gain does not apply" in rule
    assert not check(GOOD, strict, 0.955, same_data=True).passed
    assert not check(GOOD, strict, 0.97, same_data=False).passed  # more than max_drop below it: still refused


def test_every_failed_threshold_is_reported():
    v = check({"accuracy": 0.5, "p95_ms": 9.0, "size_mb": 9.0}, CFG, 0.99)
    assert not v.passed and len([r for r in v.reasons if "<" in r or ">" in r or "drop" in r]) == 4


def test_select_prefers_passing_then_accuracy_then_latency():
    ok, bad = Verdict(True), Verdict(False)
    assert select({"a": (GOOD | {"accuracy": 0.99}, bad), "b": (GOOD, ok)}) == "b"
    assert select({"a": (GOOD | {"accuracy": 0.96}, ok), "b": (GOOD, ok)}) == "a"
    assert select({"a": (GOOD | {"p95_ms": 1.5}, ok), "b": (GOOD, ok)}) == "b"
    assert select({"a": (GOOD | {"accuracy": 0.97}, bad), "b": (GOOD, bad)}) == "a"


def test_a_refusal_names_every_threshold_with_its_setting():
    v = check({"accuracy": 0.5, "p95_ms": 9.0, "size_mb": 9.0}, CFG, 0.99,
              {"fairness.slice_gap": 0.3, "accuracy.accuracy": float("nan")})
    assert v.reasons[:len(v.failed)] == v.failed and len(v.failed) == 4  # failed ones first
    for setting in ("(gate.min_accuracy)", "(gate.max_p95_latency_ms)", "(gate.max_size_mb)", "gate.min_gain)"):
        assert sum(setting in r for r in v.failed) == 1, (setting, v.failed)
    v = check({"accuracy": 0.5, "p95_ms": 9.0, "size_mb": 9.0}, CFG, 0.99, same_data=False)
    assert sum("gate.max_drop_vs_champion;" in r for r in v.failed) == 1, v.failed
    bounded = GateCfg.model_validate(CFG.model_dump() | {"card": {"fairness.slice_gap": {"max": 0.1},
                                                                  "accuracy.accuracy": {"min": 0.8}}})
    v = check(GOOD, bounded, None, {"fairness.slice_gap": 0.3, "accuracy.accuracy": float("nan")})
    assert any("(gate.card.fairness.slice_gap.max)" in r for r in v.failed)
    assert any("gate.card.accuracy.accuracy)" in r and "not measured" in r for r in v.failed)


# (accuracy, teacher's accuracy) against compress.select (floor 0.9, max drop 1 point) and the gate (floor 0.9):
# every setting that refuses the candidate is in its one reason, so a run names them all, not one per run
@pytest.mark.parametrize(("acc", "teacher", "named"), [
    (0.95, 0.95, set()),
    (0.85, 0.85, {"compress.select.min_accuracy", "gate.min_accuracy"}),  # own data under digits' floors
    (0.85, 0.95, {"compress.select.min_accuracy", "compress.select.max_drop_vs_teacher", "gate.min_accuracy"}),
    (0.92, 0.95, {"compress.select.max_drop_vs_teacher"}),
])
def test_selection_names_every_floor_that_refuses_a_candidate(acc, teacher, named):
    from ottimo.compress.pareto import Row, refusals
    from ottimo.config import SelectCfg

    row = Row("mlp", "trained", "", {"accuracy": acc, "p95_ms": 0.1, "size_mb": 0.1})
    why = refusals(row, teacher, SelectCfg(min_accuracy=0.9, max_drop_vs_teacher=1.0), GateCfg(), None) or ""
    settings = {"compress.select.min_accuracy", "compress.select.max_drop_vs_teacher", "gate.min_accuracy"}
    assert {s for s in settings if s in why} == named, why
    assert ("would also fail the gate" in why) is ("gate.min_accuracy" in named)
    alone = refusals(row, teacher, SelectCfg(min_accuracy=0.9, max_drop_vs_teacher=1.0), None, None) or ""
    assert "gate" not in alone  # run without the gate (`ottimo compress`), only the selection's floors


def test_when_nothing_qualifies_the_summary_names_both_floors():
    from ottimo.compress.pareto import Row, select
    from ottimo.config import SelectCfg

    rows = [Row("mlp", "trained", "", {"accuracy": 0.84, "p95_ms": 0.1, "size_mb": 0.1}),
            Row("mlp+int8", "int8-dyn", "mlp", {"accuracy": 0.83, "p95_ms": 0.1, "size_mb": 0.05})]
    sel = select(rows, 0.84, SelectCfg(), GateCfg(), None)
    assert sel.chosen is None
    assert sel.summary.count("compress.select.min_accuracy") == 2 and sel.summary.count("(gate.min_accuracy)") == 2
