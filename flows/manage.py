"""Manual flows for the Prefect UI: promote a chosen version (through the gate unless forced), roll back."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from ottimo.config import project_params
from tasks.manage import gate_version, promote_manually, rollback_manually


@flow(name="promote")
def promote(version: str, force: bool = False, reason: str = "", project_dir: str = ".",
            params_file: str = "params.yaml") -> dict[str, str]:
    """Make a registered version the champion if it passes the gate (`gate:` in params.yaml).

    Args:
        version: Version number of the registered model.
        force: Promote even if the gate fails; needs a reason.
        reason: Why (recorded on the version; required with force).
        project_dir: Project folder holding params.yaml.
        params_file: Config file, relative to the project folder.
    """
    if force and not reason.strip():
        raise ValueError("force=true needs a reason: it is recorded on the version as the gate override")
    root = Path(project_dir).resolve()
    params = project_params(root, params_file)

    verdict = gate_version(root, params, version)
    return promote_manually(root, params, verdict, force, reason)


@flow(name="rollback")
def rollback(reason: str = "manual rollback", project_dir: str = ".", params_file: str = "params.yaml",
             ) -> dict[str, str]:
    """Swap champion and previous-champion in one step, the event tagged on both versions.

    Args:
        reason: Why (tagged on both versions).
        project_dir: Project folder holding params.yaml.
        params_file: Config file, relative to the project folder.
    """
    root = Path(project_dir).resolve()
    return rollback_manually(root, project_params(root, params_file), reason)
