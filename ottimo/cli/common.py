"""What every `ottimo` command shares: the project and params options, reading params, finishing a flow run,
printing text that comes from data or users.

The CLI is the one part of the ottimo package that may import flows (inside command functions, so `--help`
stays fast); the core modules import neither flows, tasks nor Prefect. Rich reads `[...]` as markup and drops
what it takes for a tag (`values [nan, nan]` would print as `values `): messages, reasons, names and table cells
that hold anything but our own literal words go through `say` and `cell`, which print them as they are.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from ottimo.config import ConfigError, Params, project_params

console = Console()

PROJECT = typer.Option(Path("."), "--project-dir", "-C", help="Project folder (holds params.yaml, dvc.yaml, data/).")
PARAMS = typer.Option("params.yaml", "--params", "-p", help="Config file, relative to the project folder.")


def say(message: object, style: str | None = None, out: Console | None = None) -> None:
    """Print text as it is: no markup (a value like `[nan, nan]` stays), no highlighting; `style` for all of it."""
    (out or console).print(str(message), style=style, markup=False, highlight=False, soft_wrap=True)


def cell(value: object) -> Text:
    """A table cell (or title) that shows its text as it is, brackets included."""
    return Text(str(value))


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a message in red (as plain text: a value like `[nan, nan]` is not taken for markup) and return
    the Exit to raise."""
    say(message, "red")
    return typer.Exit(code)



def params_or_exit(root: Path, params_file: str) -> Params:
    """The project's params (a file inside the project folder), or exit 2 with the config error."""
    try:
        return project_params(root, params_file)
    except ConfigError as err:
        raise fail(str(err), 2) from None


def prefect_api() -> Callable[[], None]:
    """Start Prefect's temporary API server now, in the background, when no Prefect server is configured
    (PREFECT_API_URL unset): it boots (seconds, in its own process) while the flow's modules import, instead of
    after them. Call what this returns before running the flow: it waits for the start to end. It is Prefect's own
    ephemeral server, which the flow run finds and uses; if it could not start, the flow run starts it again and
    says why. With a server configured this does nothing."""
    import prefect.main  # noqa: F401 - Prefect's logging set up first: the start is logged as it would be
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001, S110 - the flow run's own start raises it with Prefect's message
            pass

    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()
    return thread.join


def finish(state, what: str):
    """The result of a finished flow run, or exit 1 with its state and message."""
    if not state.is_completed():
        say(f"\n{what} {state.name}: {state.message}", "red bold")
        raise typer.Exit(1)
    return state.result()
