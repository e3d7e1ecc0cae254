"""What every `ottimo` command shares: the project and params options, reading params, finishing a flow run.

The CLI is the one part of the ottimo package that may import flows (inside command functions, so `--help`
stays fast); the core modules import neither flows, tasks nor Prefect.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ottimo.config import ConfigError, Params, project_params

console = Console()

PROJECT = typer.Option(Path("."), "--project-dir", "-C", help="Project folder (holds params.yaml, dvc.yaml, data/).")
PARAMS = typer.Option("params.yaml", "--params", "-p", help="Config file, relative to the project folder.")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a message in red (as plain text: a value like `[nan, nan]` is not taken for markup) and return
    the Exit to raise."""
    console.print(message, style="red", markup=False, highlight=False)
    return typer.Exit(code)


def params_or_exit(root: Path, params_file: str) -> Params:
    """The project's params (a file inside the project folder), or exit 2 with the config error."""
    try:
        return project_params(root, params_file)
    except ConfigError as err:
        raise fail(str(err), 2) from None


def finish(state, what: str):
    """The result of a finished flow run, or exit 1 with its state and message."""
    if not state.is_completed():
        console.print(f"\n{what} {state.name}: {state.message}", style="red bold", markup=False, highlight=False)
        raise typer.Exit(1)
    return state.result()
