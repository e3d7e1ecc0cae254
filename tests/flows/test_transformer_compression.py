"""Transformer compression through the pipeline: a fused FP32 candidate, INT8 options quantized from it with the
accuracy-aware loop on, every candidate timed interleaved on two targets with 95% intervals, the report and the card
showing them; then a second run gated on "no slower than the champion"."""

from __future__ import annotations

import mlflow
import pytest

from flows.pipeline import training_pipeline
from ottimo import vocab
from ottimo.config import load_params
from ottimo.registry.gate import GateFailed
from ottimo.registry.tracking import connect
from tests.conftest import write_project
from tests.flows.test_family_pipeline import SEQUENCES, runs_by_name

TARGETS = {"edge": {"threads": 1, "batch": 1}, "server": {"threads": 1, "batch": 8}}
SETTINGS = {
    "data": SEQUENCES,
    "families": {"transformer": {"hparams": {"d_model": 16, "heads": 2, "layers": 1, "ff_dim": 16}}},
    "train": {"candidates": ["transformer"], "max_epochs": 6},
    "evaluate": {"runs": 40, "warmup": 5, "bootstrap": 300, "targets": TARGETS, "target": "edge"},
    "compress": {"enabled": True, "teacher": "transformer", "bases": ["teacher"], "fuse": True,
                 "distill": {"enabled": False}, "prune": {"unstructured": [], "structured": []},
                 "quantize": {"options": ["int8-dyn", "int8-qdq-minmax"], "accuracy_aware": True,
                              "max_fp32_nodes": 2, "calibration_rows": 64, "min_agreement": 0.5},
                 "select": {"max_drop_vs_teacher": 30.0, "min_accuracy": 0.4}},
    "gate": {"min_accuracy": 0.4, "max_p95_latency_ms": 1000.0},
    "card": {"importance_rows": 50, "importance_repeats": 1, "batch_sizes": [1, 8], "seconds_per_batch_size": 0.05},
}


@pytest.mark.slow  # two pipeline runs (about 2 min): in `make test-slow`, which CI runs after `make test`
def test_fused_and_int8_candidates_are_timed_on_every_target_and_the_gate_compares_with_the_champion(
        tmp_path, prefect_harness):
    project = write_project(tmp_path / "project", SETTINGS)
    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    params = load_params(project / "params.yaml")
    client, exp = connect(project, params.mlflow)
    parent = state.result().run_id
    runs = runs_by_name(client, exp, parent)

    fused = runs["transformer+fused"]
    assert "Attention x1" in fused.data.tags["compress.fusion"]  # the attention block became one node
    assert fused.data.metrics["nodes_after"] < fused.data.metrics["nodes_before"]
    for option in ("int8-dyn", "int8-qdq-minmax"):
        q = runs[f"transformer+fused+{option}"]
        assert q.data.tags["compress.base"] == "transformer+fused"  # INT8 starts from the fused graph
        assert q.data.metrics["integer_ops"] > 0 and q.data.params["option"] == option
        assert q.data.params["accuracy_aware"] == "True" and int(q.data.params["fp32_nodes"]) >= 0
        assert "accuracy_aware.json" in [a.path for a in client.list_artifacts(q.info.run_id)]
    for name in ("transformer+fused", "transformer+fused+int8-dyn"):  # interleaved on both targets, intervals
        m = runs[name].data.metrics
        for t in TARGETS:
            assert m[f"test_{t}.p95_low_ms"] <= m[f"test_{t}.p95_ms"] <= m[f"test_{t}.p95_high_ms"]
        assert m["test_p95_ms"] == m["test_edge.p95_ms"]  # evaluate.target decides
    report = mlflow.artifacts.load_text(f"runs:/{parent}/compression/report.md")
    assert "p95 95% interval" in report and "transformer+fused+int8-dyn" in report

    chosen = client.get_run(parent).data.tags["compress.selected"]
    text = mlflow.artifacts.load_text(f"runs:/{runs[chosen].info.run_id}/card/card.md")
    assert "Per call on each target" in text and "edge *" in text and "server" in text

    # a second run, gated on the champion's latency: the rule is measured and written with the verdict
    strict = {"gate": {**SETTINGS["gate"], "no_slower_than_champion": True, "min_gain": -100.0},  # same data
              "compress": {"enabled": False}}  # the trained transformer against the INT8 champion: latency decides
    write_project(project, {**SETTINGS, **strict})
    state = training_pipeline(project_dir=str(project), return_state=True)
    run2 = client.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.PIPELINE}'", order_by=["start_time DESC"])[0]
    reasons = run2.data.tags[vocab.GATE_REASONS]
    assert "the champion's" in reasons and "(gate.no_slower_than_champion)" in reasons, reasons
    if "slower than the champion" in reasons and "statistically" not in reasons:  # refused: the champion stays
        assert state.is_failed()
        with pytest.raises(GateFailed):
            state.result()
    else:
        assert state.is_completed(), state.message
