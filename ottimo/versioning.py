"""Data versioning with DVC's Python API: track the raw file, reproduce `prepare`, push to the remote.

The data revision of a run is the DVC hash of `data/prepared` recorded in dvc.lock.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import yaml
from dvc.repo import Repo

PREPARED = "data/prepared"


def open_repo(root: Path) -> Repo:
    """Open the DVC project at `root`, initialising it (without git if there is none) on first use."""
    logging.getLogger("dvc").setLevel(logging.WARNING)  # our tasks log one line per DVC step
    if not (root / ".dvc").is_dir():
        Repo.init(str(root), no_scm=not (root / ".git").exists())
        with Repo(str(root)).config.edit("repo") as conf:
            conf["core"]["analytics"] = False
    return Repo(str(root))


def configure_remote(repo: Repo, name: str, url: str) -> str:
    """Make `name` the default remote (written to .dvc/config.local, not to git); local paths are resolved."""
    if "://" not in url and not os.path.isabs(url):
        url = str(Path(repo.root_dir, url).resolve())
    with repo.config.edit("local") as conf:
        conf["remote"][name] = {"url": url}
        conf["core"]["remote"] = name
    return url


def track(repo: Repo, path: str) -> None:
    """`dvc add` the raw file (a no-op when its content is unchanged)."""
    repo.add(path)


def reproduce(repo: Repo, stage: str = "prepare") -> bool:
    """`dvc repro` one stage; return whether it ran (False: DVC found it up to date)."""
    bindir = os.path.dirname(sys.executable)  # the stage's `python` must be this environment's
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return bool(repo.reproduce(stage))


def push(repo: Repo) -> int:
    """`dvc push` everything tracked to the default remote; return the number of files sent."""
    return repo.push()


def revision(root: Path, out: str = PREPARED) -> str:
    """DVC's md5 of an output directory, read from dvc.lock (the data revision)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for o in stage.get("outs", []):
            if o["path"] == out:
                return o["md5"].removesuffix(".dir")
    raise KeyError(f"{out} is not an output in dvc.lock; run `dvc repro` first")
