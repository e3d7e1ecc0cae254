"""Closing steps of a pipeline run: the summary record, and cleanup of MLflow runs when a flow fails."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import task

from ottimo.config import Params, load_params
from ottimo.tracking import connect, tracking_uri
from tasks.data import DataVersion
from tasks.evaluate import Evaluated
from tasks.registry import Decision
from tasks.train import FLOW_RUN_TAG


@dataclass(frozen=True)
class PipelineSummary:
    data_revision: str
    prepared: bool
    run_id: str
    candidates: list[dict]  # family, version, metrics, verdict
    champion: str
    gate_reasons: list[str]  # every threshold the champion met
    aliases: dict[str, str]
    mlflow_ui: str


@task
def summarise(root: Path, params: Params, data: DataVersion, run_id: str, evaluated: list[Evaluated],
              versions: list[str], decision: Decision, aliases: dict[str, str]) -> PipelineSummary:
    rows = [{"family": e.family, "version": v, **e.metrics, "verdict": decision.verdicts[e.family]}
            for e, v in zip(evaluated, versions, strict=True)]
    ui = f"mlflow ui --backend-store-uri {tracking_uri(root, params.mlflow)} --host 127.0.0.1 --port 5000"
    return PipelineSummary(data.revision, data.reproduced, run_id, rows, decision.version, decision.reasons, aliases,
                           ui)


def fail_open_mlflow_runs(flow, flow_run, state) -> None:
    """Flow on_failure hook: MLflow runs of this flow run still RUNNING are marked FAILED with the reason."""
    root = Path(flow_run.parameters.get("project_dir", ".")).resolve()
    try:
        params = load_params(root / flow_run.parameters.get("params_file", "params.yaml"))
    except Exception:  # invalid config: nothing was logged
        return
    client, exp = connect(root, params.mlflow)
    runs = client.search_runs([exp], f"tags.`{FLOW_RUN_TAG}` = '{flow_run.id}' and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, "failure", (state.message or "flow failed")[:5000])
        client.set_terminated(run.info.run_id, "FAILED")
