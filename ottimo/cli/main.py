"""`ottimo`: run the pipeline and look at what the registry serves."""

from __future__ import annotations

import os
import re
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from ottimo import vocab
from ottimo.cli.card import card_app
from ottimo.cli.common import (
    PARAMS,
    PROJECT,
    cell,
    console,
    finish,
    flow_imports,
    freeze_at_exit,
    params_or_exit,
    prefect_api,
    say,
)
from ottimo.cli.compress import compress as compress_cmd
from ottimo.cli.doctor import doctor
from ottimo.cli.monitor import monitor_app, print_last_check
from ottimo.cli.registry import registry_app
from ottimo.cli.serve import serve as serve_cmd
from ottimo.config import Params

app = typer.Typer(
    help="Ottimo: DVC-versioned data → train → ONNX → evaluate → gated promotion in the MLflow registry, "
    "orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(card_app, name="card")  # `ottimo card show VERSION`, `ottimo card compare A B`
app.command(name="compress")(compress_cmd)  # `ottimo compress --run-id RUN`
app.command("doctor")(doctor)  # `ottimo doctor [--repair]`
app.registered_commands += monitor_app.registered_commands  # simulate-drift, score, drift-check
app.registered_commands += registry_app.registered_commands  # promote, rollback
app.command("serve")(serve_cmd)  # `ottimo serve [--port N]`: the online endpoint that follows the champion



@app.callback()
def _quiet() -> None:
    """Everything runs offline: no usage reporting from Prefect, MLflow or DVC; no download progress bars; a
    quick exit (freeze_at_exit)."""
    freeze_at_exit()
    for key, value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
        os.environ.setdefault(key, value)


@app.command()
def run(project_dir: Path = PROJECT, params_file: str = PARAMS,
        force: bool = typer.Option(False, "--force", help="Train even when the data revision, code and params are "
                                   "the champion's (the gate still holds the result to gate.min_gain).")) -> None:
    """Run the whole training pipeline once (validate, version data, train, export, evaluate, gate, promote);
    with nothing new since the champion (same data revision, code and params) it trains nothing and says so."""
    root = project_dir.resolve()
    params = params_or_exit(root, params_file)  # fail before Prefect starts
    api_ready = prefect_api()
    with flow_imports():
        from flows.pipeline import training_pipeline

    api_ready()
    state = training_pipeline(project_dir=str(root), params_file=params_file, force=force, return_state=True)
    if not state.is_completed():
        say(f"\nPipeline {state.name}: {state.message}", "red bold")
        say(details(root, params, str(state.state_details.flow_run_id), state.message or ""))
        raise typer.Exit(1)
    summary = state.result()
    if summary.skipped:
        say(summary.message, "yellow")
        say(f"champion is version {summary.champion}; aliases {summary.aliases}", "green")
        return
    table = Table(title=f"Gated (data revision {summary.data_revision[:12]}, "
                  f"{'prepared' if summary.prepared else 'unchanged: prepare skipped'})")
    table.box, table.show_edge, table.pad_edge = box.SIMPLE_HEAD, False, False  # fits 80 columns
    table.add_column("candidate", no_wrap=True)  # e.g. student-mlp+prune-s50: the compression report has the rest
    for col in ("ver", "acc", "F1", "p50 ms", "p95 ms", "MB", "gate"):  # version, accuracy, macro-F1, ..., size
        table.add_column(col, no_wrap=True)
    for c in summary.candidates:
        table.add_row(cell(c["family"]), str(c["version"]), f"{c['accuracy']:.4f}", f"{c['macro_f1']:.4f}",
                      f"{c['p50_ms']:.3f}", f"{c['p95_ms']:.3f}", f"{c['size_mb']:.3f}", cell(c["verdict"]))
    console.print(table)
    say(f"champion is now version {summary.champion}; aliases {summary.aliases}", "green")
    say("Gate: " + "; ".join(summary.gate_reasons))
    say(f"Browse it: {summary.mlflow_ui}")


def details(root: Path, params: Params, flow_run_id: str, message: str) -> str:
    """Where a failed run's details really are: its MLflow pipeline run when one was opened (training, the gate);
    otherwise (data refused, a DVC error: before any MLflow run) the message above, the quarantine's reason file
    it names, and the Prefect flow run's log."""
    from ottimo.registry.tracking import connect

    try:
        client, exp = connect(root, params.mlflow)
        runs = client.search_runs([exp], f"tags.`{vocab.FLOW_RUN}` = '{flow_run_id}' and "
                                  f"tags.`{vocab.KIND}` = '{vocab.PIPELINE}'", max_results=1)
    except Exception as err:  # noqa: BLE001 - a tracking server out of reach: still say where to look
        return (f"Details are in the log above (Prefect flow run {flow_run_id}); MLflow could not be asked for "
                f"its run ({type(err).__name__}).")
    if runs:
        return (f"Details are in the log above and in MLflow run {runs[0].info.run_id} of experiment "
                f"{params.mlflow.experiment} (tags gate.verdict / failure).")
    note = re.search(r"reason in (\S+\.reason\.txt)", message)
    kept = f"; the reason is also kept in {note.group(1)}" if note else ""
    return (f"It stopped before any MLflow run was opened: the message above is the whole reason{kept}; "
            f"the log above (Prefect flow run {flow_run_id}) has every step.")


@app.command()
def tune(project_dir: Path = PROJECT, params_file: str = PARAMS) -> None:
    """Run the tuning stage alone (settings under `tune:`): an Optuna study per model family, resumed if an
    earlier run was interrupted, trials n_jobs at a time on threads or Dask, each trial an MLflow run."""
    root = project_dir.resolve()
    params_or_exit(root, params_file)
    with flow_imports():
        from flows.tune import with_runner

    state = with_runner(str(root), params_file)(project_dir=str(root), params_file=params_file, return_state=True)
    finish(state, "Tuning")
    table = Table(title="Tuning: the configuration chosen per family")
    for col in ("family", "study", "trial", "val acc", "p95 ms", "complete", "pruned", "failed", "epochs"):
        table.add_column(col)
    results = state.result().values()
    for r in results:
        acc, p95 = (r.values + [float("nan")] * 2)[:2]
        table.add_row(cell(r.family), cell(r.study), "-" if r.trial is None else str(r.trial), f"{acc:.4f}",
                      f"{p95:.3f}", str(r.complete), str(r.pruned), str(r.failed), str(r.epochs))
    console.print(table)
    for r in results:
        say(f"{r.family}: {r.overrides or 'no trial ran: params.yaml as is'}")
    say("Trials, plots and best params are in MLflow (runs tune-<family>); `ottimo run` trains with the "
        "chosen settings when tune.enabled is true.")


@app.command()
def status(project_dir: Path = PROJECT, params_file: str = PARAMS) -> None:
    """Show champion, previous-champion and challenger with their metrics and data revision."""
    from ottimo.registry import versions
    from ottimo.registry.tracking import connect

    root = project_dir.resolve()
    params = params_or_exit(root, params_file)
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    by_alias = {alias: versions.alias_version(client, name, alias)
                for alias in (versions.CHAMPION, versions.PREVIOUS, versions.CHALLENGER)}
    table = Table(title=cell(f"Registered model {name}"))
    table.add_column("")
    for alias in by_alias:
        table.add_column(alias)

    def figure(mv, field: str) -> str:
        if mv is None:
            return "-"
        if field in (vocab.FAMILY, vocab.GATE_VERDICT):
            return vocab.tag(mv.tags, field, "")
        if field == vocab.DATA_REVISION:
            return vocab.tag(mv.tags, field, "")[:12]
        value = client.get_run(mv.run_id).data.metrics.get(field)
        return "" if value is None else f"{value:.4f}"

    table.add_row("version", *[str(mv.version) if mv else "-" for mv in by_alias.values()])
    for label, field in (("family", "family"), ("accuracy", "test_accuracy"), ("macro F1", "test_macro_f1"),
                         ("p95 ms", "test_p95_ms"), ("size MB", "test_size_mb"), ("data revision", vocab.DATA_REVISION),
                         ("gate", vocab.GATE_VERDICT)):
        table.add_row(label, *[cell(figure(mv, field)) for mv in by_alias.values()])
    console.print(table)
    if by_alias[versions.CHAMPION] is None:
        console.print("No champion yet: run [cyan]ottimo run[/cyan] (or [cyan]make run[/cyan]).")
    print_last_check(console, root, params)


if __name__ == "__main__":
    app()
