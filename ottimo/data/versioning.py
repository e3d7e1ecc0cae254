"""Data versioning with DVC: track the raw file, reproduce `prepare`, push to the remote.

DVC's Python API runs in this process (one import instead of a fresh interpreter per command); every path is
absolute, so nothing depends on the working directory. `dvc repro prepare` runs in this process too when the stage's
command is the one ottimo ships (`python -m ottimo.data.tables prepare ...`): DVC decides as `dvc repro` does
(unchanged: skipped; an identical earlier run: restored from its run cache) and, where it would start a fresh
interpreter for the command, the same function runs here, and what it wrote is recorded as `dvc repro` records it
(the same dvc.lock, run cache and cache). Any other command goes to `dvc repro` as a subprocess in the project
folder, with this environment's `python` first on PATH, its output read for what DVC did and kept for the error.
The data revision of a run is the DVC hash of `data/prepared` recorded in dvc.lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import yaml

if TYPE_CHECKING:
    from dvc.repo import Repo

PREPARED = "data/prepared"
T = TypeVar("T")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # DVC colours its links even when nothing is a terminal


class DvcError(RuntimeError):
    """A DVC command failed; the message carries DVC's own words."""


class RemoteUnavailable(DvcError):
    """`dvc push` could not write to the remote (unreachable, moved, full): transient, worth a retry."""


def dvc(root: Path, *args: str) -> str:
    """Run `dvc ARGS` in `root` as a subprocess; return stdout, raise DvcError with DVC's own message on failure."""
    env = os.environ | {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                        "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root}:\n{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


_LOGGERS = ("dvc", "dvc_objects", "dvc_data")
_IN_PROCESS = threading.Lock()  # DVC's loggers are process-wide: one in-process DVC call at a time


@cache
def _dvc_api() -> None:
    """Import DVC once, undoing what `import dvc` does to the process: colorama.init() wraps sys.stdout and
    sys.stderr when they are not terminals, and console handlers go on DVC's loggers (each call below swaps them
    for its own capture)."""
    out, err = sys.stdout, sys.stderr
    import dvc.repo  # noqa: F401

    sys.stdout, sys.stderr = out, err


class _Captured(logging.Handler):
    """DVC's warnings and errors during one call, worded as its command line prints them."""

    def __init__(self) -> None:
        from dvc.logger import ColorFormatter

        super().__init__(logging.WARNING)
        self.setFormatter(ColorFormatter(log_colors=False))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _in_process(root: Path, command: str, call: Callable[[Repo], T], *, failure: str = "",
                error: type[DvcError] = DvcError, init: bool = False) -> T:
    """`call(repo)` on the DVC repo at `root` (created first when `init`), its progress bars off and its log
    records captured; any failure raises `error` worded like `dvc COMMAND` on the command line would word it
    (`failure` is the CLI's lead-in), with no exception chained (retry policies read the chain)."""
    _dvc_api()
    from dvc.repo import Repo

    loggers = [logging.getLogger(name) for name in _LOGGERS]
    progress = logging.getLogger("dvc.progress")  # DVC's bars show only when this logger lets ERROR through
    with _IN_PROCESS:
        saved = [(lg, lg.handlers, lg.level, lg.propagate) for lg in loggers], progress.level
        captured = _Captured()
        for lg in loggers:
            lg.handlers, lg.propagate = [captured], False
            lg.setLevel(logging.WARNING)
        progress.setLevel(logging.CRITICAL)
        try:
            with (Repo.init(str(root), no_scm=not (root / ".git").exists()) if init else Repo(str(root))) as repo:
                return call(repo)
        except Exception as err:  # noqa: BLE001 - whatever DVC raised, as the command line would say it
            record = logging.makeLogRecord({"levelno": logging.ERROR, "levelname": "ERROR", "msg": failure,
                                            "exc_info": (type(err), err, err.__traceback__)})
            message = "\n".join([*captured.lines, captured.format(record)])
        finally:
            for lg, handlers, level, propagate in saved[0]:
                lg.handlers, lg.propagate = handlers, propagate
                lg.setLevel(level)
            progress.setLevel(saved[1])
    raise error(f"`dvc {command}` failed in {root}:\n{ANSI.sub('', message)}")  # outside `except`: nothing chained


def _edit_config(level: str, edit: Callable[[dict], None]) -> Callable[[Repo], None]:
    def call(repo: Repo) -> None:
        with repo.config.edit(level) as conf:
            edit(conf)
    return call


def ensure_repo(root: Path) -> None:
    """Initialise DVC in `root` (without git if there is none) with analytics off, once."""
    if not (root / ".dvc").is_dir():
        _in_process(root, "init", _edit_config("repo", lambda conf: conf["core"].update(analytics="false")),
                    init=True)  # `dvc init [--no-scm]` then `dvc config core.analytics false`


def configure_remote(root: Path, name: str, url: str) -> str:
    """Make `name` the default remote, in .dvc/config.local (not in git); local paths are resolved."""
    if "://" not in url and not os.path.isabs(url):
        url = str((root / url).resolve())
    name = name.lower()  # as `dvc remote add` names it

    def edit(conf: dict) -> None:  # `dvc remote add --local --force --default NAME URL`
        conf["remote"][name] = {"url": url}
        conf["core"]["remote"] = name

    _in_process(root, f"remote add --local --force --default {name} {url}", _edit_config("local", edit))
    return url


def track(root: Path, path: str) -> None:
    """`dvc add` the raw file (a no-op when its content is unchanged)."""
    _in_process(root, f"add {path}", lambda repo: repo.add([str(root / path)]))


RAN, RESTORED, SKIPPED = "ran", "restored from DVC's run cache", "unchanged, skipped"


def reproduce(root: Path, stage: str = "prepare") -> str:
    """`dvc repro` one stage; return what DVC did: RAN (it ran the command), RESTORED (the outputs of an identical
    earlier run came back from the run cache) or SKIPPED (up to date). Not from whether dvc.lock changed: a fresh
    clone runs the stage and writes the very lock it already had. ottimo's own stage command runs in this process
    (module docstring); any other through `dvc repro`, what it did read from its own words."""
    did = _in_process(root, f"repro {stage}", lambda repo: _reproduce_here(repo, stage),
                      failure=f"failed to reproduce '{stage}'")
    if did is not None:
        return did
    out = dvc(root, "repro", stage)
    if f"Running stage '{stage}'" in out:
        return RAN
    return RESTORED if "is cached" in out else SKIPPED


def _reproduce_here(repo: Repo, name: str) -> str | None:
    """`dvc repro NAME` for a stage whose command `stage_call` can run in this process, as DVC's Stage.reproduce
    and run_stage do it with the command's subprocess replaced by the call; None for any other stage (and for one
    whose upstream stages changed: `dvc repro` does those)."""
    import networkx as nx
    from dvc.repo import lock_repo
    from dvc.stage.cache import RunCacheNotFoundError

    # DVC's run cache names its stages by "dvc.yaml" relative to the working directory, as its command line
    # runs from the project folder: so does this, for the call (process-wide; in-process DVC calls take turns)
    with lock_repo(repo), contextlib.chdir(repo.root_dir):
        graph = repo.index.graph
        stage = next((s for s in graph if getattr(s, "name", None) == name and s.path_in_repo == "dvc.yaml"), None)
        call = stage_call(stage.cmd) if stage is not None else None  # no such stage: `dvc repro` says so
        if call is None or any(s.changed() for s in nx.descendants(graph, stage)):  # DVC's edges point upstream:
            return None  # a changed stage there is for `dvc repro` (a .dvc file whose data changed is re-added)
        if not stage.changed():
            return SKIPPED
        stage.remove_outs(ignore_remove=False, force=False)
        try:
            repo.stage_cache.restore(stage)  # an identical earlier run: its outputs come back from the cache
            did = RESTORED
        except RunCacheNotFoundError:
            call(Path(stage.wdir))
            did = RAN
        stage.save()  # what `dvc repro` does after running the command: hashes and the run cache,
        stage.commit()  # the outputs into the cache,
        stage.dump(update_pipeline=False)  # dvc.lock
        return did


def stage_call(cmd: str | list[str]) -> Callable[[Path], object] | None:
    """A stage command this process can run itself, as a call taking the stage's folder: `python -m
    ottimo.data.tables ARGS` (dvc.yaml's prepare), whose fresh interpreter would import what this one has."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else []
    if argv[:3] != ["python", "-m", "ottimo.data.tables"]:
        return None
    from ottimo.data import tables

    return lambda wdir: tables.run_stage(argv[3:], wdir)


def push(root: Path) -> None:
    """`dvc push` everything tracked to the default remote; RemoteUnavailable when the remote refuses it."""
    _in_process(root, "push", lambda repo: repo.push(), failure="failed to push data to the cloud",
                error=RemoteUnavailable)


def status_cloud(root: Path) -> dict:
    """`dvc status -c`: what differs between the cache and the remote ({} when in sync)."""
    return _in_process(root, "status --cloud", lambda repo: repo.status(cloud=True))


def revision(root: Path, out: str = PREPARED) -> str:
    """DVC's md5 of an output directory, read from dvc.lock (the data revision)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for o in stage.get("outs", []):
            if o["path"] == out:
                return o["md5"].removesuffix(".dir")
    raise KeyError(f"{out} is not an output in dvc.lock; run `dvc repro` first")


def checkout_dir(root: Path, md5: str, dst: Path) -> Path:
    """Materialise an old data revision (DVC md5 of a directory) at `dst` with `dvc pull`: a throw-away .dvc
    file names the hash, and DVC takes it from its cache or else from the default remote. `dst` must lie
    inside the project."""
    dst.mkdir(parents=True, exist_ok=True)
    pointer = dst / "revision.dvc"
    pointer.write_text(yaml.safe_dump({"outs": [{"md5": f"{md5}.dir", "hash": "md5", "path": "prepared"}]}))

    def pull(repo: Repo) -> None:
        if not repo.config["core"].get("remote"):  # what `dvc pull` says first
            logging.getLogger("dvc").warning("No remote provided and no default remote set.")
        repo.pull([str(pointer)])

    try:
        _in_process(root, f"pull {pointer.relative_to(root)}", pull, failure="failed to pull data from the cloud")
    except DvcError as err:
        raise DvcError(f"data revision {md5[:12]} is in neither the DVC cache nor the remote: {err}") from None
    return dst / "prepared"
