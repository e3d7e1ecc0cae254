"""`ottimo simulate-drift | score | drift-check`, and the last drift check for `status`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ottimo import vocab
from ottimo.cli.common import PARAMS, PROJECT, fail, finish, flow_imports, params_or_exit, say
from ottimo.config import Params

monitor_app = typer.Typer()
COLUMNS = typer.Option(None, "--column", help="Features to shift (repeat the option); default: all.")


@monitor_app.command("simulate-drift")
def simulate_drift(
    kind: str = typer.Option("none", help="none | shift | scale | noise | rotate | blur | prior | missing"),
    severity: float = typer.Option(0.0, help="shift/noise: std units; scale: +fraction; rotate: x45 degrees; "
                                   "blur: sigma in pixels; prior/missing: share of rows/values (0-1)"),
    batches: int = typer.Option(1, min=1), rows: int = typer.Option(200, min=1),
    columns: list[str] = COLUMNS,
    labels: bool = typer.Option(True, help="Keep the target column (labelled batches)."),
    seed: int = typer.Option(0), fmt: str = typer.Option("parquet", "--format", help="parquet | csv"),
    source: str = typer.Option("test", help="Held-out split to draw from: test | val | reference."),
    project_dir: Path = PROJECT, params_file: str = PARAMS,
) -> None:
    """Write seeded batches with a controlled shift into data/incoming, drawn from a held-out split."""
    import pandas as pd

    from ottimo.monitor import simulate

    root = project_dir.resolve()
    params = params_or_exit(root, params_file)
    split = root / "data" / "prepared" / f"{source}.parquet"
    if source not in ("test", "val", "reference") or not split.is_file():
        raise fail(f"{split} not found: run `ottimo run` first (source is test, val or reference)", 2)
    df = pd.read_parquet(split)
    features = [c for c in df.columns if c != params.data.target]
    try:
        frames = simulate.batches(df, features, params.data.target, kind, severity, batches, rows, seed, labels,
                                  columns=columns or None, image_shape=params.card.image_shape or (
                                      params.data.input.shape if params.data.input.kind == "image" else None))
        paths = simulate.write(frames, root / params.score.incoming, f"sim-{kind}-{seed}", fmt)
    except simulate.SimulationError as err:
        raise fail(str(err), 2) from None
    say(f"wrote {len(paths)} batch(es) of {rows} rows ({kind}, severity {severity}) to "
        f"{params.score.incoming}: {', '.join(p.name for p in paths)}")


@monitor_app.command()
def score(project_dir: Path = PROJECT, params_file: str = PARAMS) -> None:
    """Score every new batch in data/incoming with the champion (malformed batches go to data/quarantine)."""
    root = project_dir.resolve()
    params_or_exit(root, params_file)
    with flow_imports():
        from flows.score import batch_scoring

    results = finish(batch_scoring(project_dir=str(root), params_file=params_file, return_state=True), "Scoring")
    for r in results:
        say(f"{r.batch}: {r.rows} rows{' (labelled)' if r.labelled else ''} -> {Path(r.predictions).name}")
    if not results:
        say("no new batches")


@monitor_app.command("drift-check")
def drift_check(project_dir: Path = PROJECT, params_file: str = PARAMS, accept_drifted: bool = typer.Option(
        False, "--accept-drifted", help="on retrain, append labelled rows that fail the training data's value "
        "checks or lie far outside its range (held back by default)")) -> None:
    """Run the drift check once: Evidently on the scored batches → nothing | retrain | rollback."""
    root = project_dir.resolve()
    params_or_exit(root, params_file)
    with flow_imports():
        from flows.drift import drift_check as flow

    summary = finish(flow(project_dir=str(root), params_file=params_file, accept_drifted=accept_drifted,
                        return_state=True), "Drift check")
    say(f"decision: {summary.action}", "bold")
    for reason in summary.reasons:
        say(f"  - {reason}")
    for key, value in summary.outcome.items():
        say(f"  {key}: {value}")


def print_last_check(out: Console, root: Path, params: Params) -> None:
    """The newest drift check, its decision and reasons, and how many scored batches wait for the next one."""
    from ottimo.monitor import ledger
    from ottimo.registry.tracking import connect

    client, _ = connect(root, params.mlflow)
    found = client.get_experiment_by_name(ledger.experiment_name(params))  # not created by looking
    run = ledger.last_check(client, found.experiment_id) if found else None
    waiting = len(ledger.unchecked(client, found.experiment_id)) if found else 0
    if run is None:
        say(f"Last drift check: none yet ({waiting} scored batch(es) waiting); run `ottimo drift-check`.", out=out)
        return
    when = datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
    tags = run.data.tags
    out.print(f"Last drift check: {when}, champion v{escape(tags.get('champion', '?'))}: "
              f"[bold]{escape(str(tags.get('decision')))}[/bold] ({escape(tags.get('reasons', ''))})", highlight=False)
    outcome = {k.removeprefix(vocab.OUTCOME): v for k, v in tags.items() if k.startswith(vocab.OUTCOME)}
    if outcome:
        say("  outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(outcome.items())), out=out)
    say(f"  {waiting} scored batch(es) waiting for the next check; MLflow run {run.info.run_id} in {found.name}",
        out=out)
