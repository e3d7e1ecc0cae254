"""Registry policy on MLflow: versions tagged with their lineage, aliases moved champion-first.

Aliases: `champion` is served, `previous-champion` is what rollback restores, `challenger` is the
latest candidate. Versions are looked up by their run-id tag before one is created.
"""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from ottimo.vocab import CHALLENGER, CHAMPION, ONNX_FILE, PREVIOUS  # noqa: F401  (the alias names, re-exported)


def alias_version(client: MlflowClient, name: str, alias: str):
    """The ModelVersion behind an alias, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """{alias: version} of a registered model ({} when it is not registered yet)."""
    try:
        return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    except MlflowException:
        return {}


def register(client: MlflowClient, name: str, model_uri: str, run_id: str, tags: dict[str, str]):
    """Register `model_uri` once per run: return the existing version tagged with `run_id` if any."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Classifier promoted by Ottimo's gate (ONNX).")
    existing = client.search_model_versions(f"name = '{name}' and tags.run_id = '{run_id}'")
    if existing:
        return existing[0]
    # a logged model (models:/m-<id>) must be named by its id too, or a tracking server refuses the source
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    return client.create_model_version(name, model_uri, run_id=run_id, tags={"run_id": run_id, **tags},
                                       model_id=model_id)


def version(client: MlflowClient, name: str, ref: str):
    """A version by number ("3") or by alias ("champion")."""
    return client.get_model_version(name, ref) if str(ref).isdigit() else client.get_model_version_by_alias(name, ref)


def download_verified(client: MlflowClient, name: str, ref: str, dst: Path) -> tuple[Path, object]:
    """Download the ONNX file (only) of `name` version/alias `ref` and check it against the version's sha256 tag."""
    from ottimo.onnx.export import verify_sha256  # imports torch: only where a file is downloaded

    mv = version(client, name, ref)
    expected = mv.tags.get("sha256")
    if not expected:
        raise MlflowException(f"{name} v{mv.version} has no sha256 tag; it cannot be verified, so it is not loaded")
    # the ONNX file alone: the model's other files (MLmodel, environments, examples) are not needed to serve it
    local = Path(download_artifacts(artifact_uri=f"models:/{name}/{mv.version}/{ONNX_FILE}", dst_path=str(dst)))
    return verify_sha256(local, expected), mv
