"""What the Prefect UI shows of a pipeline run: every task run's inputs are of a kind the UI can render (no
`flow_run` inputs, on which Prefect 3.8's Task Runs tab fails with "Invalid TaskInputResponse"), and the
per-candidate task runs are named after their candidate."""

from __future__ import annotations

from tests.conftest import write_project
from tests.flows.test_compress import COMPRESS_TINY


def task_runs_of_the_api() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    runs: list = []
    with get_client(sync_client=True) as client:  # limit and sort given: the 3.8 client sends None otherwise (422)
        while page := client.read_task_runs(limit=200, offset=len(runs), sort=TaskRunSort.EXPECTED_START_TIME_ASC):
            runs += page
    return runs


def test_pipeline_task_runs_have_no_flow_run_inputs_and_say_which_candidate(tmp_path, prefect_harness):
    from flows.pipeline import training_pipeline

    project = write_project(tmp_path / "project", {
        "train": {"candidates": ["mlp", "transformer"], "max_epochs": 4},
        "tune": {"enabled": True, "n_trials": 2, "n_jobs": 1},
        "compress": COMPRESS_TINY, "gate": {"min_accuracy": 0.3}})
    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message

    runs = task_runs_of_the_api()
    flow_inputs = {f"{r.name}.{arg}" for r in runs for arg, inputs in r.task_inputs.items()
                   for i in inputs if i.input_type == "flow_run"}
    assert not flow_inputs, f"task inputs of type flow_run: {sorted(flow_inputs)}"
    kinds = {i.input_type for r in runs for inputs in r.task_inputs.values() for i in inputs}
    assert "task_run" in kinds  # lineage between tasks is still recorded

    names = {r.name for r in runs}
    chosen = state.result().candidates[0]["family"]
    assert {"train_candidate[mlp]", "train_candidate[transformer]", "export_candidate[mlp]",
            "evaluate_candidate[transformer]", "open_study[mlp]", "run_trials[transformer worker 0]",
            "close_study[mlp]", "distill_student[student-mlp]", "prune_variant[student-mlp+prune-s50]",
            "quantize_variant[student-mlp+int8-qdq-minmax]", "quantize_variant[student-mlp+prune-s50+int8-qdq-minmax]",
            f"register_candidate[{chosen}]", f"model_card[{chosen} v1]"} <= names, sorted(names)


def test_deployments_say_what_they_do_and_the_custom_run_form_names_params_yaml_values(tmp_path):
    import json

    from flows.serve import deployments

    project = write_project(tmp_path / "project", {"gate": {"min_accuracy": 0.8}, "train": {"candidates": ["mlp"]}})
    served = {d.full_name: d for d in deployments(str(project))}
    assert set(served) == {"training-pipeline/nightly", "tuning/tune-hyperparameters", "batch-scoring/score-incoming",
                           "drift-check/scheduled", "promote/promote-version", "rollback/rollback-champion"}
    for d in served.values():
        assert d.description and "ottimo" in d.tags and len(d.tags) >= 3, d.full_name
        schema = d._parameter_openapi_schema.model_dump_for_openapi()
        text = json.dumps(schema)
        assert '"type": "null"' not in text and "Params" not in schema.get("definitions", {}), d.full_name
        for name, prop in schema["properties"].items():
            assert prop.get("description") and prop.get("default", "") is not None, (d.full_name, name)
    form = served["training-pipeline/nightly"]._parameter_openapi_schema.properties
    assert form["min_accuracy"]["description"].endswith("empty: params.yaml's gate.min_accuracy (0.8).")
    assert form["max_epochs"]["description"].endswith("empty: params.yaml's train.max_epochs (12).")
    assert form["candidates"]["description"].endswith('empty: params.yaml\'s train.candidates (["mlp"]).')
    assert form["tune_enabled"]["type"] == "boolean" and "default" not in form["tune_enabled"]
    assert set(served["tuning/tune-hyperparameters"]._parameter_openapi_schema.properties) == {
        "project_dir", "params_file"}  # what the pipeline hands its stage is not a form field
