"""What every `ottimo` command shares: the project and params options, reading params, finishing a flow run,
printing text that comes from data or users.

The CLI is the one part of the ottimo package that may import flows (inside command functions, so `--help`
stays fast); the core modules import neither flows, tasks nor Prefect. Rich reads `[...]` as markup and drops
what it takes for a tag (`values [nan, nan]` would print as `values `): messages, reasons, names and table cells
that hold anything but our own literal words go through `say` and `cell`, which print them as they are.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import cache
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


@contextlib.contextmanager
def flow_imports() -> Iterator[None]:
    """Import a flow's module (and with it Prefect, MLflow, torch, ONNX) with the cyclic garbage collector paused,
    then freeze what exists by then out of its reach: modules, classes and functions that live as long as the
    command. Left to it, the collector ran full passes during these imports and walked the million objects they
    leave at every later full pass (1.2 M here), freeing next to nothing: 2.1 s of GC in an `ottimo run`, against
    1.3 s in the plain script that does the same work (bench/overhead.py). Objects made after it are collected as
    ever."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


@cache
def freeze_at_exit() -> None:
    """At exit, once every other exit handler has run (this one is registered first), freeze the objects left
    out of the garbage collector's reach: the interpreter's last collections over what Prefect, MLflow,
    SQLAlchemy and torch leave took 1 to 3 s of every run and free nothing that the process's end does not. Exit
    handlers, flushes and closes run as before (finalizers of objects alive at exit never were guaranteed)."""
    atexit.register(gc.freeze)


def prefect_api() -> Callable[[], None]:
    """Start Prefect's temporary API server now, in the background, when no Prefect server is configured
    (PREFECT_API_URL unset and ephemeral mode on): it boots in its own process while the flow's modules import,
    instead of after them. It is the server Prefect would start for the flow run (its SubprocessASGIServer's
    uvicorn command and settings), launched without importing Prefect's server package here (1.4 s of CPU the
    flow's imports would wait for). Call what this returns before running the flow: it waits until the server
    answers, then points this process and its children at it. It stops at exit. If it does not answer in Prefect's
    start-up timeout it is stopped and the flow run starts Prefect's own, which says why. With a server configured
    this does nothing."""
    import prefect
    import prefect.main  # noqa: F401 - Prefect's logging set up first: the start is logged as Prefect logs it
    from prefect.logging import get_logger
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    from ottimo.ops.postgres import free_port

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    url = f"{address}/api"
    proc = subprocess.Popen(  # as prefect.server.api.server.SubprocessASGIServer runs it
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
             **get_current_settings().to_environment_variables(exclude_unset=True)})
    atexit.register(_stop, proc)
    # Flow-run heartbeats tell a lasting server that a run's process lives (to mark a silent one Crashed); this
    # server ends with the process, so none is sent, unless set: each costs a wait of up to 1 s at the run's end
    quiet = {} if "heartbeat_frequency" in get_current_settings().flows.model_fields_set else {
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    log = get_logger()  # "prefect", as Prefect logs its own temporary server
    log.info("Starting temporary server on %s (stopped when this command ends; `make up` runs a lasting one)",
             address)

    def ready() -> None:
        from ottimo.ops.servers import answers  # after the start: it imports the ONNX and MLflow stacks

        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        while not answers(f"{url}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                return
            time.sleep(0.1)
        os.environ["PREFECT_API_URL"] = url  # child processes (a Dask LocalCluster's workers) find it too
        _SETTINGS.enter_context(temporary_settings({PREFECT_API_URL: url} | quiet))

    return ready


_SETTINGS = contextlib.ExitStack()  # the temporary server's URL, for the rest of the command


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def finish(state, what: str):
    """The result of a finished flow run, or exit 1 with its state and message."""
    if not state.is_completed():
        say(f"\n{what} {state.name}: {state.message}", "red bold")
        raise typer.Exit(1)
    return state.result()
