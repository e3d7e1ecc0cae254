"""Scoring tasks: fetch the champion's ONNX file (sha256-verified), score each incoming batch, quarantine the bad."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact

from ottimo import batches, monitor, registry
from ottimo.cardstore import prepared_for
from ottimo.config import Params
from ottimo.data import DataValidationError
from ottimo.export import IntegrityError, sha256
from ottimo.measure import predict, session
from ottimo.tracking import connect
from tasks.train import FLOW_RUN_TAG, work_dir


class BatchRejected(ValueError):
    """One or more batches broke the training schema and were quarantined; the rest were scored."""


@dataclass(frozen=True)
class Champion:
    version: str
    onnx_path: str  # verified against the version's sha256 tag
    data_revision: str
    prepared: str  # the prepared splits it was trained on (reference split and schema.json)


@dataclass(frozen=True)
class Scored:
    batch: str
    ok: bool
    rows: int = 0
    labelled: bool = False
    predictions: str = ""
    run_id: str = ""
    reason: str = ""  # why it was quarantined
    quarantined: str = ""


def _transient(task, task_run, state) -> bool:
    """Retry a failed download, never a refusal: a hash mismatch or a missing champion stays failed."""
    try:
        state.result()
    except (IntegrityError, LookupError):
        return False
    except Exception:
        return True
    return False


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
def load_champion(root: Path, params: Params, ref: str = registry.CHAMPION) -> Champion:
    """Download the champion's ONNX file and check its sha256 against the version tag (a mismatch raises
    IntegrityError: nothing is loaded); locate the data revision it was trained on."""
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    if registry.alias_version(client, name, ref) is None:
        raise LookupError(f"{name} has no {ref!r} version: run the training pipeline (`ottimo run`) first")
    mv = registry.version(client, name, ref)
    path, mv = registry.download_verified(client, name, mv.version, work_dir(root, f"serving-v{mv.version}"))
    revision = mv.tags.get("data_revision", "")
    prepared = prepared_for(root, revision)
    get_run_logger().info("%s v%s (%s) loaded, sha256 verified; trained on data revision %s", name, mv.version,
                          ref, revision[:12])
    return Champion(str(mv.version), str(path), revision, str(prepared))


@task
def find_batches(root: Path, params: Params) -> list[str]:
    found = batches.pending(root / params.score.incoming)
    get_run_logger().info("%d batch(es) to score in %s", len(found), params.score.incoming)
    return [str(p) for p in found]


@task
def score_batch(root: Path, params: Params, champion: Champion, batch: str) -> Scored:
    """Validate one batch against the training schema and write its predictions next to it; a malformed
    batch is moved to quarantine with a reason file instead (the flow fails at the end, naming it)."""
    log = get_run_logger()
    path = Path(batch)
    schema = batches.schema_of(Path(champion.prepared))
    try:
        df = batches.validate_batch(path, schema)
    except DataValidationError as err:
        moved = batches.quarantine(path, root / params.score.quarantine, str(err))
        log.error("quarantined %s: %s", path.name, err)
        return Scored(path.name, False, reason=str(err), quarantined=str(moved))
    pred = predict(session(Path(champion.onnx_path)), df[schema["features"]].to_numpy(dtype="float32"))
    out = batches.write_predictions(path, pred, schema["labels"], champion.version)
    labelled = schema["target"] in df.columns
    client, exp = monitor.connect_monitoring(root, params)
    run_id = monitor.record_score(client, exp, path, out, len(df), labelled, champion.version, sha256(path),
                                  {FLOW_RUN_TAG: str(runtime.flow_run.id)})
    log.info("scored %s: %d rows%s with v%s -> %s", path.name, len(df), " (labelled)" if labelled else "",
             champion.version, out.name)
    return Scored(path.name, True, len(df), labelled, str(out), run_id)


@task
def report_scoring(params: Params, champion: Champion, results: list[Scored]) -> list[Scored]:
    """A Prefect markdown artifact listing every batch; raises BatchRejected when any was quarantined."""
    lines = [f"# Batch scoring with {params.mlflow.registered_model} v{champion.version}", "",
             "| batch | result | rows | labelled |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.batch} | {'scored' if r.ok else 'quarantined'} | {r.rows} | {r.labelled} |" for r in results]
    bad = [r for r in results if not r.ok]
    lines += ["", *[f"- **{r.batch}** quarantined: {r.reason}" for r in bad]]
    create_markdown_artifact(markdown="\n".join(lines), key="batch-scoring",
                             description=f"{len(results) - len(bad)} scored, {len(bad)} quarantined")
    if bad:
        raise BatchRejected(
            f"{len(bad)} batch(es) quarantined in {params.score.quarantine} (reason files beside them); the other "
            f"{len(results) - len(bad)} were scored and the champion is unchanged:\n"
            + "\n".join(f"- {r.batch}: {r.reason}" for r in bad)
            + "\nFix the file(s) and put them back in " + params.score.incoming + " to score them.")
    return results
