"""`ottimo promote VERSION` and `ottimo rollback`: alias moves by hand, through the same flows as the UI's."""

from __future__ import annotations

from pathlib import Path

import typer

from ottimo.cli.common import PARAMS, PROJECT, finish, flow_imports, params_or_exit, say

registry_app = typer.Typer()


@registry_app.command()
def promote(version: str, force: bool = typer.Option(False, help="Promote even if the gate fails."),
            reason: str = typer.Option("", help="Why; required with --force."),
            project_dir: Path = PROJECT, params_file: str = PARAMS) -> None:
    """Make VERSION the champion through the gate (or past it with --force and --reason)."""
    root = project_dir.resolve()
    params_or_exit(root, params_file)
    with flow_imports():
        from flows.manage import promote as flow

    after = finish(flow(version=version, force=force, reason=reason, project_dir=str(root),
                         params_file=params_file, return_state=True), "Promote")
    say(f"aliases now {after}")


@registry_app.command()
def rollback(reason: str = typer.Option("manual rollback", help="Why (tagged on both versions)."),
             project_dir: Path = PROJECT, params_file: str = PARAMS) -> None:
    """Swap champion and previous-champion back in one step."""
    root = project_dir.resolve()
    params_or_exit(root, params_file)
    with flow_imports():
        from flows.manage import rollback as flow

    after = finish(flow(reason=reason, project_dir=str(root), params_file=params_file, return_state=True),
                    "Rollback")
    say(f"aliases now {after}")
