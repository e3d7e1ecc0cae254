"""Compression: pruning reaches its sparsity, structured pruning really shrinks, quantized graphs hold integer ops
and keep their accuracy, distillation uses the teacher's soft targets, the selection policy's truth table, and
the pipeline promoting a compressed candidate (then `ottimo compress` alone, passing and failing)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from ottimo import vocab
from ottimo.compress import pareto, quantize, techniques
from ottimo.config import ConfigError, Params, SelectCfg, deep_merge, parse_params
from ottimo.data.tables import Splits, builtin_frame, split_frame
from ottimo.models.family import count_parameters, recipe
from ottimo.models.train import fit
from ottimo.onnx.export import export_onnx
from ottimo.onnx.measure import predict, session
from ottimo.registry import versions
from ottimo.registry.gate import GateFailed
from tests.conftest import write_project

TINY = parse_params({"train": {"max_epochs": 15, "patience": 4}, "families": {
    "mlp": {"hparams": {"hidden": [32]}}, "transformer": {"hparams": {"d_model": 16, "heads": 2, "layers": 1,
                                                                     "ff_dim": 32}}}})


@pytest.fixture(scope="module")
def splits() -> Splits:
    torch.set_num_threads(1)
    params = Params()
    parts = split_frame(builtin_frame("digits"), params.data)
    X = {k: v.drop(columns="target").to_numpy(np.float32) for k, v in parts.items()}
    y = {k: v["target"].to_numpy(np.int64) for k, v in parts.items()}
    return Splits(X["train"], y["train"], X["val"], y["val"], X["test"], y["test"], list(parts["train"].columns[:-1]),
                  list(range(10)))


@pytest.fixture(scope="module")
def trained(splits) -> dict:
    return {f: fit(recipe(TINY.families, TINY.train, f), splits, TINY.train, seed=0).model
            for f in ("mlp", "transformer")}


def test_global_magnitude_pruning_reaches_target_sparsity_after_finetuning(trained, splits):
    model = techniques.magnitude_prune(copy.deepcopy(trained["transformer"]), 0.6)
    assert techniques.sparsity(model) == pytest.approx(0.6, abs=0.005)
    techniques.finetune(model, splits, techniques.FinetuneSpec(epochs=6, lr=2e-3))
    techniques.make_permanent(model)
    assert techniques.sparsity(model) == pytest.approx(0.6, abs=0.005)  # fine-tuning kept the pruned weights at zero
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    dense = techniques.accuracy(trained["transformer"], splits.X_test, splits.y_test)
    assert techniques.accuracy(model, splits.X_test, splits.y_test) >= dense - 0.05, dense


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_structured_pruning_shrinks_parameters_and_onnx_file(family, trained, splits, tmp_path):
    dense = trained[family]
    small = techniques.structured_prune(dense, splits.input, 10, 0.5)
    assert count_parameters(small) < 0.85 * count_parameters(dense)
    assert techniques.sparsity(small) == 0.0  # removed, not zeroed
    assert small[1](torch.zeros(3, 64)).shape == (3, 10)  # the classifier keeps every class
    if family == "mlp":  # the file too (exports take seconds; the pipeline test measures the transformer's)
        a = export_onnx(dense, splits.input, tmp_path / "dense.onnx").stat().st_size
        b = export_onnx(small, splits.input, tmp_path / "small.onnx").stat().st_size
        assert a - b >= 4 * 0.9 * (count_parameters(dense) - count_parameters(small)), (a, b)  # FP32 bytes removed
    techniques.finetune(small, splits, techniques.FinetuneSpec(epochs=2, lr=1e-3))
    dense_acc = techniques.accuracy(dense, splits.X_test, splits.y_test)
    assert techniques.accuracy(small, splits.X_test, splits.y_test) >= dense_acc - 0.05, dense_acc


def test_quantized_graphs_hold_integer_ops_and_keep_accuracy(trained, splits, tmp_path):
    src = export_onnx(trained["mlp"], splits.input, tmp_path / "fp32.onnx")
    dyn = quantize.quantize(src, tmp_path / "dyn.onnx", quantize.QuantOption.parse("int8-dyn"))
    static = quantize.quantize(src, tmp_path / "static.onnx", quantize.QuantOption.parse("int8-qdq-minmax-pc"),
                               splits.X_train[:128])
    assert quantize.op_counts(dyn)["MatMulInteger"] >= 2 and quantize.op_counts(src)["MatMulInteger"] == 0
    ops = quantize.op_counts(static)
    assert ops["QuantizeLinear"] >= 2 and ops["DequantizeLinear"] >= 2 and quantize.integer_ops(src) == 0

    def acc(path: Path) -> float:
        return float((predict(session(path), splits.X_test) == splits.y_test).mean())

    for path in (dyn, static):
        assert path.stat().st_size < 0.75 * src.stat().st_size  # INT8 weights (plus scales and graph overhead)
        assert acc(path) >= acc(src) - 0.02


def test_distillation_loss_uses_the_teachers_soft_targets():
    gen = torch.Generator().manual_seed(0)
    student, teacher, other = (torch.randn(16, 10, generator=gen) for _ in range(3))
    y = torch.randint(0, 10, (16,), generator=gen)
    base = techniques.distillation_loss(student, teacher, y, temperature=4.0, alpha=0.7)
    assert techniques.distillation_loss(student, teacher, y, 1.0, 0.7) != pytest.approx(base.item())
    assert techniques.distillation_loss(student, other, y, 4.0, 0.7) != pytest.approx(base.item())
    # the student matching the teacher leaves only the hard-label term
    same = techniques.distillation_loss(teacher, teacher, y, 4.0, 0.7)
    assert same.item() == pytest.approx(0.3 * torch.nn.functional.cross_entropy(teacher, y).item(), rel=1e-5)
    # alpha 0: plain cross-entropy, whatever the teacher says
    assert techniques.distillation_loss(student, other, y, 4.0, 0.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(student, y).item())


def test_distilled_student_reaches_the_accuracy_floor(trained, splits):
    r = recipe(TINY.families, TINY.train, "mlp", {"hparams": {"hidden": [32], "dropout": 0.0}})
    spec = techniques.FinetuneSpec(epochs=15, lr=3e-3)
    student = techniques.distill(trained["transformer"], splits, r, spec, temperature=4.0, alpha=0.7)
    assert count_parameters(student) < count_parameters(trained["transformer"])
    assert techniques.accuracy(student, splits.X_test, splits.y_test) >= 0.9


def row(name: str, acc: float, p95: float, size: float = 0.1, error: str | None = None) -> pareto.Row:
    return pareto.Row(name, "x", "", {"accuracy": acc, "macro_f1": acc, "p50_ms": p95 / 2, "p95_ms": p95,
                                      "throughput_rps": 1 / p95, "size_mb": size}, error=error)


@pytest.mark.parametrize(("rows", "cfg", "chosen"), [
    # fastest within the allowed drop wins
    ([row("t", 0.97, 0.10), row("fast", 0.965, 0.01), row("faster-but-worse", 0.95, 0.005)], {}, "fast"),
    # a drop exactly at the limit qualifies; one beyond it does not
    ([row("t", 0.97, 0.10), row("edge", 0.96, 0.02)], {"max_drop_vs_teacher": 1.0}, "edge"),
    ([row("t", 0.97, 0.10), row("edge", 0.96, 0.02)], {"max_drop_vs_teacher": 0.5}, "t"),
    # the absolute floor applies even to the teacher
    ([row("t", 0.85, 0.10), row("s", 0.85, 0.01)], {"min_accuracy": 0.9}, None),
    # a candidate that failed (e.g. quantized predictions disagree) never wins
    ([row("t", 0.97, 0.10), row("broken", 0.97, 0.01, error="agreement 80%")], {}, "t"),
    # other objectives; ties broken by accuracy
    ([row("t", 0.97, 0.10, 0.3), row("small", 0.97, 0.2, 0.05)], {"objective": "size_mb"}, "small"),
    ([row("t", 0.97, 0.10), row("s", 0.975, 0.01)], {"objective": "accuracy"}, "s"),
    ([row("a", 0.97, 0.01), row("b", 0.98, 0.01)], {}, "b"),
    # a p95 difference below the measurement noise is a tie: accuracy decides (the 0.0002 ms), then size,
    # then name; beyond the tolerance latency decides; with no tolerance any difference does
    ([row("t", 0.97, 0.10), row("mlp", 0.9667, 0.0100), row("student+prune", 0.9778, 0.0102)], {}, "student+prune"),
    ([row("t", 0.97, 0.10), row("a", 0.965, 0.0100), row("b", 0.965, 0.0105, size=0.05)], {}, "b"),
    ([row("t", 0.97, 0.10), row("b", 0.965, 0.0101), row("a", 0.965, 0.0100)], {}, "a"),
    ([row("t", 0.97, 0.10), row("fast", 0.965, 0.010), row("slower", 0.97, 0.020)], {}, "fast"),
    ([row("t", 0.97, 0.10), row("mlp", 0.9667, 0.0100), row("student+prune", 0.9778, 0.0102)],
     {"latency_tie_ms": 0.0, "latency_tie_relative": 0.0}, "mlp"),
    # the relative tolerance (5% by default) on slower models; p50 ties the same way; size never ties
    ([row("t", 0.97, 2.0), row("x", 0.96, 1.00), row("y", 0.97, 1.04)], {}, "y"),
    ([row("t", 0.97, 2.0), row("x", 0.96, 1.00), row("y", 0.97, 1.06)], {}, "x"),
    ([row("t", 0.97, 2.0), row("x", 0.96, 1.00), row("y", 0.97, 1.04)], {"objective": "p50_ms"}, "y"),
    ([row("t", 0.97, 0.1, 0.100), row("x", 0.96, 0.1, 0.0500), row("y", 0.97, 0.1, 0.0501)],
     {"objective": "size_mb"}, "x"),
])
def test_selection_policy_truth_table(rows, cfg, chosen):
    sel = pareto.select(rows, teacher_accuracy=rows[0].metrics["accuracy"], cfg=SelectCfg(**cfg))
    assert sel.chosen == chosen
    assert set(sel.reasons) == {r.name for r in rows}  # every candidate has its reason
    if chosen is None:
        assert sel.summary.startswith("no candidate qualifies") and "below the floor" in sel.summary
    else:
        assert sel.reasons[chosen].startswith("chosen")


CHAMPION_CASES = [
    # the fastest drops 2 points against a 0.98 champion (max 1) on new data: the fastest that the gate passes wins
    ([row("t", 0.98, 0.10), row("fast", 0.96, 0.01), row("mid", 0.975, 0.05)], {}, 0.98, "mid"),
    # ... on the champion's data none beats it by gate.min_gain: the best by the objective goes on (to be refused)
    ([row("t", 0.98, 0.10), row("fast", 0.96, 0.01), row("mid", 0.975, 0.05)], {}, (0.98, True), "fast"),
    ([row("t", 0.99, 0.10), row("fast", 0.96, 0.01), row("mid", 0.99, 0.05)], {}, (0.98, True), "mid"),
    # ... and with no champion the fastest passes
    ([row("t", 0.98, 0.10), row("fast", 0.96, 0.01), row("mid", 0.975, 0.05)], {}, None, "fast"),
    # the gate's floor is above compress.select's
    ([row("t", 0.98, 0.10), row("fast", 0.93, 0.01), row("mid", 0.975, 0.05)], {"min_accuracy": 0.95}, None, "mid"),
    # its latency and size limits
    ([row("t", 0.98, 0.10), row("fast", 0.975, 0.01, 9.0), row("mid", 0.975, 0.05)], {}, None, "mid"),
    ([row("t", 0.98, 6.0), row("s", 0.975, 8.0, 0.01)], {"max_p95_latency_ms": 7.0}, None, "t"),
    # model-card bounds are measured after the selection, on the registered version: they do not filter here
    ([row("t", 0.98, 0.10), row("fast", 0.975, 0.01)], {"card": {"fairness.recall_spread": {"max": 0.1}}}, None,
     "fast"),
    # nobody can pass: the best by the objective goes on, and the gate refuses it with its reasons
    ([row("t", 0.95, 0.10), row("fast", 0.94, 0.01)], {}, 0.99, "fast"),
    # gate-passing candidates within the latency noise: the more accurate one
    ([row("t", 0.98, 0.10), row("fast", 0.96, 0.0100), row("a", 0.975, 0.0101), row("b", 0.98, 0.0102)], {}, 0.98,
     "b"),
]


@pytest.mark.parametrize(("rows", "gate", "champion", "chosen"), CHAMPION_CASES)
def test_selection_puts_the_gate_against_the_champion_first(rows, gate, champion, chosen):
    from ottimo.config import GateCfg
    from ottimo.registry.gate import check

    cfg, gate_cfg = SelectCfg(max_drop_vs_teacher=5.0), GateCfg(**gate)
    champion, same_data = champion if isinstance(champion, tuple) else (champion, False)
    sel = pareto.select(rows, rows[0].metrics["accuracy"], cfg, gate_cfg, champion, same_data)
    assert sel.chosen == chosen and sel.reasons[chosen].startswith("chosen")
    assert set(sel.reasons) == {r.name for r in rows}
    passing = {r.name for r in rows
               if check(r.metrics, gate_cfg.model_copy(update={"card": {}}), champion, same_data=same_data).passed}
    if passing:  # a candidate the gate would refuse is never chosen over one it would pass
        assert chosen in passing
        assert all("would fail the gate" in sel.reasons[n] for n in {r.name for r in rows} - passing)
    else:
        assert "no qualifying candidate passes the gate" in sel.reasons[chosen]
    without = pareto.select(rows, rows[0].metrics["accuracy"], cfg)  # no gate given: the selection alone
    assert without.chosen == pareto.select(rows, rows[0].metrics["accuracy"], cfg, None, champion).chosen


def test_reasons_and_pareto_front():
    rows = [row("t", 0.97, 0.10), row("fast", 0.965, 0.01), row("worse", 0.95, 0.005), row("slow", 0.96, 0.2)]
    sel = pareto.select(rows, 0.97, SelectCfg())
    assert "2.00 points below the teacher" in sel.reasons["worse"]
    assert "qualifies but worse p95_ms" in sel.reasons["t"]
    assert pareto.pareto_front(rows) == ["t", "fast", "worse"]  # "slow" is beaten by t on both axes


def test_config_checks_the_teacher_and_the_student():
    with pytest.raises(ConfigError, match="compress.teacher 'transformer' is not in train.candidates"):
        parse_params({"train": {"candidates": ["mlp"]}, "compress": {"enabled": True}})
    with pytest.raises(ConfigError, match="distill.enabled is false"):
        parse_params({"compress": {"distill": {"enabled": False}}})


COMPRESS_TINY = {"enabled": True, "bases": ["student"],
                 "prune": {"unstructured": [], "structured": [0.5], "finetune_epochs": 2},
                 "quantize": {"options": ["int8-qdq-minmax"], "calibration_rows": 64},
                 "distill": {"epochs": 10, "hparams": {"hidden": [32]}},
                 "select": {"max_drop_vs_teacher": 3.0, "min_accuracy": 0.5}}


def test_pipeline_promotes_the_selected_compressed_candidate(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.pipeline import training_pipeline
    from ottimo.cli.main import app
    from ottimo.config import load_params
    from ottimo.registry.tracking import connect

    project = write_project(tmp_path / "project", {"train": {"candidates": ["transformer"], "max_epochs": 8},
                                                   "compress": COMPRESS_TINY, "gate": {"min_accuracy": 0.5}})
    params = load_params(project / "params.yaml")
    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    client, exp = connect(project, params.mlflow)
    parent = client.get_run(summary.run_id)
    chosen = parent.data.tags["compress.selected"]
    names = {"transformer", "student-mlp", "student-mlp+prune-s50", "student-mlp+int8-qdq-minmax",
             "student-mlp+prune-s50+int8-qdq-minmax"}
    assert chosen in names - {"transformer"}  # the teacher in ORT is slower than every distilled MLP
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{summary.run_id}' and "
                                     "tags.`ottimo.kind` = 'compressed'")
    assert {r.info.run_name for r in runs} == names - {"transformer"}
    for r in runs:  # each candidate: figures, technique settings, its ONNX model, the selection's reason
        assert r.info.status == "FINISHED" and {"test_accuracy", "test_p95_ms", "parameters"} <= set(r.data.metrics)
        assert r.data.params["technique"] and r.data.tags["compress.selection"]
        assert "model.onnx" in [a.path for a in client.list_artifacts(r.info.run_id, "")] or r.outputs.model_outputs
    assert {"compression/pareto.png", "compression/report.md", "compression/report.html"} <= {
        a.path for a in client.list_artifacts(summary.run_id, "compression")}
    assert [c["family"] for c in summary.candidates] == [chosen]  # only the contender is registered and gated
    mv = versions.alias_version(client, params.mlflow.registered_model, "champion")
    assert mv.tags["family"] == chosen and vocab.tag(mv.tags, vocab.GATE_VERDICT) == "passed"
    assert client.get_run(mv.run_id).data.tags["compress.base"]
    with get_client(sync_client=True) as prefect:  # every filter given: the 3.8 client sends None otherwise (422)
        published = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["compression-report"])),
            flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), limit=10, offset=0,
            sort=ArtifactSort.KEY_ASC)
    assert len(published) == 1 and f"**Selected: {chosen}**" in published[0].data
    structured = next(r for r in runs if r.info.run_name == "student-mlp+prune-s50")
    student = next(r for r in runs if r.info.run_name == "student-mlp")
    assert structured.data.metrics["parameters"] < student.data.metrics["parameters"]
    assert structured.data.metrics["test_size_mb"] < student.data.metrics["test_size_mb"]

    # the stage alone on the pipeline run: the teacher and its dynamic INT8 variant, nested under the same run
    alone = {"bases": ["teacher"], "distill": {"enabled": False}, "prune": {"unstructured": [], "structured": []},
             "quantize": {"options": ["int8-dyn"], "min_agreement": 0.5},
             "select": {"max_drop_vs_teacher": 100.0, "min_accuracy": 0.0}}
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["compress"] |= alone
    (project / "alone.yaml").write_text(yaml.safe_dump(raw))
    cli = CliRunner().invoke(app, ["compress", "--run-id", summary.run_id, "-C", str(project), "-p", "alone.yaml"])
    assert cli.exit_code == 0, cli.output
    out = " ".join(cli.output.split())  # rich wraps long lines
    assert "transformer+int8-dyn:" in out and "chosen: best p95_ms" in out
    dyn = client.search_runs([exp], "attributes.run_name = 'transformer+int8-dyn'")[0]
    assert dyn.data.tags["mlflow.parentRunId"] == summary.run_id and dyn.data.metrics["integer_ops"] > 0

    # nothing qualifies: the gate fails with every candidate's reason, and the pipeline run says so (the task in a
    # flow of its own, as flows call it: its logs go to that flow run)
    from prefect import flow

    from tasks.compress import report_and_select

    parent = client.create_run(exp, run_name="pipeline").info.run_id
    rows = [pareto.Row(r.name, r.technique, r.base, r.metrics, run_id=client.create_run(exp).info.run_id)
            for r in [row("transformer", 0.93, 0.08), row("student-mlp", 0.95, 0.01)]]
    strict = params.model_copy(update={"compress": params.compress.model_copy(update={
        "select": SelectCfg(min_accuracy=0.99)})})
    with pytest.raises(GateFailed, match=r"gate failed: no candidate qualifies: transformer: accuracy 0.9300 below "
                                         r"the floor 0.9900 \(compress.select.min_accuracy\); student-mlp: "
                                         r"accuracy 0.9500 below"):
        flow(name="select-alone")(lambda: report_and_select(project, strict, rows, "transformer", parent))()
    tags = client.get_run(parent).data.tags
    assert tags["gate.verdict"] == "failed" and "no candidate qualifies" in tags["gate.reasons"]
    assert tags["compress.selected"] == "none"


@pytest.mark.slow  # two pipeline runs, about 40 s; the policy is pareto.select's (tests/unit/test_gate.py)
def test_with_a_champion_the_pipeline_picks_a_candidate_the_gate_passes(tmp_path, prefect_harness):
    """The gate's constraints come first in the selection: candidates that would drop too far below the champion
    lose to one that passes, however fast they are (reruns no longer fail the gate on a latency coin toss)."""
    from flows.pipeline import training_pipeline
    from ottimo.config import load_params
    from ottimo.registry.tracking import connect

    gate = {"min_accuracy": 0.5, "min_gain": -0.5}  # same data: a candidate may trail the champion by half a point
    project = write_project(tmp_path / "project", {"train": {"candidates": ["mlp"]}, "gate": gate})
    first = training_pipeline(project_dir=str(project), return_state=True)  # the champion: a well-trained MLP
    assert first.is_completed(), first.message
    params = load_params(project / "params.yaml")
    client, exp = connect(project, params.mlflow)
    champion = versions.alias_version(client, params.mlflow.registered_model, "champion")
    champion_acc = client.get_run(champion.run_id).data.metrics["test_accuracy"]

    # then a weak transformer teacher whose students are fast, and a compression selection that lets them all in
    raw = deep_merge(yaml.safe_load((project / "params.yaml").read_text()), {
        "train": {"candidates": ["mlp", "transformer"]},
        "families": {"transformer": {"hparams": {"d_model": 8, "ff_dim": 8}}},
        "compress": deep_merge(COMPRESS_TINY, {"select": {"max_drop_vs_teacher": 60.0, "min_accuracy": 0.3},
                                          "distill": {"epochs": 2, "hparams": {"hidden": [8]}}})})
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    second = training_pipeline(project_dir=str(project), return_state=True)  # the same MLP, trained again
    assert second.is_completed(), second.message
    summary = second.result()
    parent = client.get_run(summary.run_id)
    assert parent.data.tags["gate.verdict"] == "passed"
    chosen = parent.data.tags["compress.selected"]
    runs = {r.data.tags[vocab.CANDIDATE_NAME]: r for r in client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{summary.run_id}'") if "compress.selection" in r.data.tags}
    accuracy = {name: r.data.metrics["test_accuracy"] for name, r in runs.items()}
    assert accuracy[chosen] >= champion_acc - 0.005 - 1e-9, (chosen, accuracy, champion_acc)
    refused = {n for n, a in accuracy.items() if a < champion_acc - 0.005 - 1e-9}
    assert refused, (accuracy, champion_acc)  # the case that failed reruns: candidates the gate would refuse
    for name in refused:
        assert "would fail the gate" in runs[name].data.tags["compress.selection"], runs[name].data.tags
    assert f"champion {champion_acc:.4f}" in runs[chosen].data.tags["compress.selection"]
