"""`ottimo doctor [--repair]`: report, and repair, what a crash left in the registry and the tracking store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ottimo.cli.common import PARAMS, PROJECT, console, params_or_exit, say


def doctor(
    repair: bool = typer.Option(False, "--repair", help="Apply the safe repairs (under the promotion lock)."),
    flow_runs: bool = typer.Option(True, "--flow-runs/--no-flow-runs",
                                   help="Also check Prefect flow runs left Running by a killed process (uses "
                                        "PREFECT_API_URL, else Prefect's ephemeral API)."),
    project_dir: Path = PROJECT,
    params_file: str = PARAMS,
) -> None:
    """Check the registry and MLflow runs for what a crash leaves: a half-done alias move, runs left RUNNING,
    versions without a gate verdict or sha256, a missing champion, previous-champion = champion, Prefect flow runs
    left Running by a killed process (set Crashed). Exit code 1 while anything is left unrepaired."""
    from ottimo.ops.doctor import examine
    from ottimo.registry.tracking import connect

    root = project_dir.resolve()
    params = params_or_exit(root, params_file)
    client, exp = connect(root, params.mlflow)
    findings = examine(client, exp, params.mlflow.registered_model, params.reliability, repair=repair)
    if flow_runs:
        from tasks.doctor import flow_runs as stale_flow_runs  # the Prefect part lives with the tasks

        try:
            findings += stale_flow_runs(root, params, repair)
        except Exception as err:  # noqa: BLE001 - no Prefect API: the registry checks still count
            say(f"Prefect flow runs not checked: {type(err).__name__}: {err}", "yellow")
    if not findings:
        say(f"{params.mlflow.registered_model}: registry and runs are consistent", "green")
        return
    say(f"ottimo doctor: {params.mlflow.registered_model}: {len(findings)} finding(s)")
    status = {True: "[green]repaired[/green]", False: "[yellow]found[/yellow]", None: "[red]needs you[/red]"}
    for f in findings:  # lines, not a table: nothing gets cut off in a narrow terminal or a log
        console.print(f"{status[f.repaired]} {escape(f'{f.check} {f.subject}: {f.problem}')}", soft_wrap=True,
                      highlight=False)
        say(f"    {'repair' if f.repaired is not None else 'what to do'}: {f.action}")
    left = [f for f in findings if not f.repaired]
    if left:
        hint = "run [cyan]ottimo doctor --repair[/cyan]" if any(f.repaired is False for f in left) else \
            "see the repair column"
        console.print(f"{len(left)} problem(s) left: {hint}")
        raise typer.Exit(1)
