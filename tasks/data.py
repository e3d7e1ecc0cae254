"""Data tasks: validate the raw file, version and prepare it with DVC, push it to the remote."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task

from ottimo.config import Params
from ottimo.data import versioning
from ottimo.data.intake import DataValidationError, quarantine
from ottimo.data.tables import materialise_raw, read_checked, validate_frame
from ottimo.ops.faults import checkpoint
from tasks.retry import RETRY_TRANSIENT

REMOTE_ENV = "OTTIMO_DVC_REMOTE_URL"  # where `dvc push` goes, over dvc.remote_url (README "team's infrastructure")


@dataclass(frozen=True)
class DataVersion:
    revision: str  # DVC md5 of data/prepared
    prepared: str  # path of the prepared splits
    reproduced: bool  # False when DVC found `prepare` up to date (or restored its outputs from the run cache)


@task
def validate_raw(root: Path, params: Params) -> int:
    """Write the builtin data set if needed, then check the raw file against the limits and the schema; return
    its row count. A rejected file is copied to the quarantine (the original stays) and the run stops."""
    path = materialise_raw(root, params.data)
    try:
        df = validate_frame(read_checked(root, path, params.limits, params.data), params.data, path,
                            params.limits)
    except DataValidationError as err:
        kept, note = quarantine(root, path, str(err), params.limits)
        where = f"a copy is in {kept.relative_to(root)}" if kept else "no copy was made"
        raise type(err)(f"{err}\nQuarantined: {where} (reason in {note.relative_to(root)}); {params.data.path} "
                        "is left as it was. Fix it and run again; nothing was versioned or trained.") from None
    get_run_logger().info("raw data %s: %d rows x %d columns, schema ok", params.data.path, *df.shape)
    return len(df)


@task
def prepare_data(root: Path, params: Params) -> DataVersion:
    """`dvc add` the raw file and `dvc repro prepare`; DVC skips the stage when nothing changed."""
    versioning.ensure_repo(root)
    versioning.track(root, params.data.path)
    did = versioning.reproduce(root, "prepare")
    rev = versioning.revision(root)
    get_run_logger().info("data revision %s (prepare %s)", rev[:12], did)
    checkpoint("after-prepare")
    return DataVersion(rev, str(root / versioning.PREPARED), did == versioning.RAN)


@task(**RETRY_TRANSIENT)
def push_data(root: Path, params: Params) -> str:
    """`dvc push` raw and prepared data to the default remote (retried when the remote is out of reach, only then)."""
    # OTTIMO_DVC_REMOTE_URL (the team stack's bucket, or a team's own) wins over params.yaml's dvc.remote_url
    url = versioning.configure_remote(root, params.dvc.remote, os.environ.get(REMOTE_ENV) or params.dvc.remote_url)
    versioning.push(root)
    get_run_logger().info("dvc push: data in sync with remote %s", url)
    return url
