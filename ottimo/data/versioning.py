"""Data versioning with the DVC command line: track the raw file, reproduce `prepare`, push to the remote.

DVC runs as a subprocess in the project folder (it resolves paths from its working directory), with
this environment's `python` first on PATH so the stage command runs the same code. The data revision
of a run is the DVC hash of `data/prepared` recorded in dvc.lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

PREPARED = "data/prepared"


class DvcError(RuntimeError):
    """A DVC command failed; the message carries its output."""


class RemoteUnavailable(DvcError):
    """`dvc push` could not write to the remote (unreachable, moved, full): transient, worth a retry."""


def dvc(root: Path, *args: str) -> str:
    """Run `dvc ARGS` in `root`; return stdout, raise DvcError with DVC's own message on failure."""
    env = os.environ | {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                        "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root}:\n{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def ensure_repo(root: Path) -> None:
    """Initialise DVC in `root` (without git if there is none) with analytics off, once."""
    if not (root / ".dvc").is_dir():
        dvc(root, "init", "--quiet", *([] if (root / ".git").exists() else ["--no-scm"]))
        dvc(root, "config", "core.analytics", "false")


def configure_remote(root: Path, name: str, url: str) -> str:
    """Make `name` the default remote, in .dvc/config.local (not in git); local paths are resolved."""
    if "://" not in url and not os.path.isabs(url):
        url = str((root / url).resolve())
    dvc(root, "remote", "add", "--local", "--force", "--default", name, url)
    return url


def track(root: Path, path: str) -> None:
    """`dvc add` the raw file (a no-op when its content is unchanged)."""
    dvc(root, "add", "--quiet", path)


RAN, RESTORED, SKIPPED = "ran", "restored from DVC's run cache", "unchanged, skipped"


def reproduce(root: Path, stage: str = "prepare") -> str:
    """`dvc repro` one stage; return what DVC did, from its own words: RAN (it ran the command), RESTORED (the
    outputs of an identical earlier run came back from the run cache) or SKIPPED (up to date). Not from whether
    dvc.lock changed: a fresh clone runs the stage and writes the very lock it already had."""
    out = dvc(root, "repro", stage)
    if f"Running stage '{stage}'" in out:
        return RAN
    return RESTORED if "is cached" in out else SKIPPED


def push(root: Path) -> None:
    """`dvc push` everything tracked to the default remote; RemoteUnavailable when the remote refuses it."""
    try:
        dvc(root, "push", "--quiet")
    except DvcError as err:
        raise RemoteUnavailable(str(err)) from None


def status_cloud(root: Path) -> dict:
    """`dvc status -c`: what differs between the cache and the remote ({} when in sync)."""
    return json.loads(dvc(root, "status", "--cloud", "--json") or "{}")


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
    try:
        dvc(root, "pull", "--quiet", str(pointer.relative_to(root)))
    except DvcError as err:
        raise DvcError(f"data revision {md5[:12]} is in neither the DVC cache nor the remote: {err}") from None
    return dst / "prepared"
