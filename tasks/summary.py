"""Closing steps of a pipeline run: the summary record, and cleanup of MLflow runs when a flow fails."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import MarkdownArtifact, create_markdown_artifact

from ottimo import vocab
from ottimo.config import Params, project_params
from ottimo.monitor import ledger
from ottimo.registry import report
from ottimo.registry.runkey import Novelty
from ottimo.registry.tracking import connect, tracking_uri
from ottimo.registry.versions import aliases as registry_aliases
from tasks.data import DataVersion
from tasks.evaluate import Evaluated
from tasks.registry import GateDecision


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
    skipped: bool = False  # nothing new since the champion: nothing trained (runkey.decide)
    message: str = ""  # why nothing was trained, when skipped; empty otherwise


def mlflow_ui(root: Path, params: Params) -> str:
    """Where to browse the registry: a tracking server's own page, or the command that serves a local store."""
    uri = tracking_uri(root, params.mlflow)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/models/{params.mlflow.registered_model}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open http://127.0.0.1:5000"


@task
def summarise(root: Path, params: Params, data: DataVersion, run_id: str, evaluated: list[Evaluated],
              versions: list[str], decision: GateDecision, aliases: dict[str, str]) -> PipelineSummary:
    rows = [{"family": e.family, "version": v, **e.metrics, "verdict": decision.verdicts[e.family]}
            for e, v in zip(evaluated, versions, strict=True)]
    ui = mlflow_ui(root, params)
    client, exp = connect(root, params.mlflow)
    outcome = report.passed(client, exp, run_id, decision.family, decision.version, decision.reasons,
                            decision.expected_champion)
    report.record(client, run_id, outcome, params, data.revision)  # name, metrics, description of the run
    publish_links(root, params, run_id, rows, decision, aliases)
    return PipelineSummary(data.revision, data.reproduced, run_id, rows, decision.version, decision.reasons, aliases,
                           ui)


@task
def summarise_skip(root: Path, params: Params, data: DataVersion, run_id: str, novelty: Novelty) -> PipelineSummary:
    """The pipeline run that trained nothing, since its run key is the champion's: said so on its MLflow run
    (tag pipeline.skipped, name, description; FINISHED), in the log and as the flow run's markdown artifact."""
    client, _ = connect(root, params.mlflow)
    md = report.record_skip(client, run_id, params, data.revision, str(novelty.champion), novelty.message)
    client.set_terminated(run_id, "FINISHED")
    name = params.mlflow.registered_model
    create_markdown_artifact(markdown=f"# Training pipeline: nothing new, champion is {name} v{novelty.champion}"
                             f"\n\nMLflow run: `{run_id}`\n\n{md}", key="pipeline-summary",
                             description=f"Nothing new since the champion of {name}: nothing trained")
    get_run_logger().info("%s", novelty.message)
    return PipelineSummary(data.revision, data.reproduced, run_id, [], str(novelty.champion), [],
                           registry_aliases(client, name), mlflow_ui(root, params), True, novelty.message)


def publish_links(root: Path, params: Params, run_id: str, rows: list[dict], decision: GateDecision,
                  aliases: dict[str, str]) -> None:
    """A markdown artifact on the Prefect flow run: its MLflow run, the registered versions, the gate verdict.
    Links when MLflow is a server (http); the run id and store otherwise."""
    uri = tracking_uri(root, params.mlflow)
    _, exp = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    web = uri.rstrip("/") if uri.startswith("http") else None

    def link(text: str, path: str) -> str:
        return f"[{text}]({web}/#/{path})" if web else f"`{text}`"

    def version(v: str) -> str:
        return link(f"v{v}", f"models/{name}/versions/{v}")

    lines = [f"# Training pipeline: champion is {name} {version(decision.version)}",
             "", f"MLflow run: {link(run_id, f'experiments/{exp}/runs/{run_id}{vocab.CLASSIC_VIEW}')}"
             + ("" if web else f" in `{uri}`"), "",
             "| family | version | accuracy | p95 ms | size MB | gate |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['family']} | {version(str(r['version']))} | "
              f"{r['accuracy']:.4f} | {r['p95_ms']:.3f} | {r['size_mb']:.3f} | {r['verdict']} |" for r in rows]
    lines += ["", f"**Gate: {'PASS' if decision.passed else 'FAIL'}** ({decision.family} v{decision.version})", ""]
    lines += [f"- {reason}" for reason in decision.reasons]
    lines += ["", "Aliases: " + ", ".join(f"`{a}` → v{v}" for a, v in sorted(aliases.items())),
              "", f"Registry: {link(name, f'models/{name}')}"]
    create_markdown_artifact(markdown="\n".join(lines), key="pipeline-summary",
                             description=f"MLflow run, registered versions and gate verdict of {name}")


def summarise_failure(flow, flow_run, state) -> None:
    """Flow on_failure hook of the pipeline: its MLflow run still gets its summary (what each candidate scored, why
    the gate refused or what failed) as name, metrics and description, and the flow run a markdown artifact."""
    root = Path(flow_run.parameters.get("project_dir", ".")).resolve()
    try:
        params = project_params(root, flow_run.parameters.get("params_file", "params.yaml"))
    except Exception:  # invalid config: nothing was logged
        return
    client, exp = connect(root, params.mlflow)
    runs = client.search_runs([exp], f"tags.`{vocab.FLOW_RUN}` = '{flow_run.id}' and "
                              f"tags.`{vocab.KIND}` = '{vocab.PIPELINE}'", max_results=1)
    if not runs:  # failed before the pipeline run was opened (validation, data): the traceback says it all
        return
    run = runs[0]
    outcome = report.collect(client, exp, run.info.run_id, state.message or "flow failed")
    md = report.record(client, run.info.run_id, outcome, params, run.data.tags.get(vocab.DATA_REVISION, ""))
    uri = tracking_uri(root, params.mlflow)
    where = (f"[{run.info.run_id}]({uri.rstrip('/')}/#/experiments/{exp}/runs/{run.info.run_id}{vocab.CLASSIC_VIEW})"
             if uri.startswith("http") else f"`{run.info.run_id}` in `{uri}`")
    MarkdownArtifact(markdown=f"# Training pipeline failed\n\nMLflow run: {where}\n\n{md}", key="pipeline-summary",
                     description=f"Why the pipeline failed; {params.mlflow.registered_model} unchanged",
                     flow_run_id=flow_run.id).create()


@task
def report_to_drift_check(root: Path, params: Params, check_id: str, champion: str, skipped: str = "") -> None:
    """The pipeline's last step when a drift check's retrain started it: its outcome (completed, or skipped with
    why when nothing was new) and champion on that check run (a retrain started through a deployment is otherwise
    known there only by its flow-run id)."""
    client, _ = ledger.connect_monitoring(root, params)
    outcome = "skipped" if skipped else "completed"
    ledger.record_retrain(client, check_id, outcome, champion, skipped or None)
    get_run_logger().info("drift check %s: retrain %s, champion v%s", check_id, outcome, champion)


def fail_open_mlflow_runs(flow, flow_run, state) -> None:
    """Flow on_failure hook: MLflow runs of this flow run still RUNNING are marked FAILED with the reason; the
    drift check that started it (parameter drift_check_run) learns that its retrain failed."""
    root = Path(flow_run.parameters.get("project_dir", ".")).resolve()
    try:
        params = project_params(root, flow_run.parameters.get("params_file", "params.yaml"))
    except Exception:  # invalid config: nothing was logged
        return
    if check_id := flow_run.parameters.get("drift_check_run"):
        mclient, _ = ledger.connect_monitoring(root, params)
        ledger.record_retrain(mclient, check_id, "failed", message=state.message or "training pipeline failed")
    client, exp = connect(root, params.mlflow)
    runs = client.search_runs([exp], f"tags.`{vocab.FLOW_RUN}` = '{flow_run.id}' and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, vocab.FAILURE, vocab.clip(state.message or "flow failed"))
        client.set_terminated(run.info.run_id, "FAILED")
