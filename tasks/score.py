"""Scoring tasks: fetch the champion's ONNX file (sha256-verified), score each incoming batch, quarantine the bad."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact

from ottimo import vocab
from ottimo.card.store import prepared_for
from ottimo.config import Params
from ottimo.data import batches
from ottimo.data.tables import DataValidationError
from ottimo.monitor import ledger
from ottimo.onnx.export import sha256
from ottimo.onnx.measure import predict
from ottimo.ops.doctor import owner
from ottimo.ops.faults import checkpoint
from ottimo.registry import versions
from ottimo.registry.security import fetch_verified, serving_session
from ottimo.registry.tracking import connect, work_dir
from tasks.retry import RETRY_TRANSIENT


class BatchRejected(ValueError):
    """One or more batches broke the training schema and were quarantined; the rest were scored."""


@dataclass(frozen=True)
class Champion:
    version: str
    onnx_path: str  # verified against the version's sha256 tag
    data_revision: str
    prepared: str  # the prepared splits it was trained on (reference split and schema.json)
    sha256: str = ""  # the version's tag: checked again each time a session is opened (security.serving_session)

    def session(self):
        """An onnxruntime session of the champion's file, opened only after its sha256 matches again."""
        return serving_session(Path(self.onnx_path), self.sha256)


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


@task(**RETRY_TRANSIENT)  # a dropped download is retried; a hash mismatch, a missing champion, an unsafe file never
def load_champion(root: Path, params: Params, ref: str = versions.CHAMPION) -> Champion:
    """Download the champion's ONNX file and check its sha256 against the version tag (a mismatch raises
    IntegrityError: nothing is loaded); locate the data revision it was trained on."""
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    if versions.alias_version(client, name, ref) is None:
        raise LookupError(f"{name} has no {ref!r} version: run the training pipeline (`ottimo run`) first")
    mv = versions.version(client, name, ref)
    path, mv = fetch_verified(client, name, mv.version, work_dir(root, f"serving-v{mv.version}"))
    revision = vocab.tag(mv.tags, vocab.DATA_REVISION, "")
    prepared = prepared_for(root, revision)
    get_run_logger().info("%s v%s (%s) loaded, sha256 verified; trained on data revision %s", name, mv.version,
                          ref, revision[:12])
    return Champion(str(mv.version), str(path), revision, str(prepared), mv.tags["sha256"])


@task
def find_batches(root: Path, params: Params) -> list[str]:
    found = batches.pending(root / params.score.incoming)
    get_run_logger().info("%d batch(es) to score in %s", len(found), params.score.incoming)
    return [str(p) for p in found]


@task
def score_batch(root: Path, params: Params, champion: Champion, batch: str) -> Scored:
    """Check one batch as training data is checked (ottimo.data.batches.validate_batch) and write its predictions
    next to it; a malformed batch is moved to quarantine with a reason file instead (the flow fails at the end,
    naming it). Exactly once: the score run is looked up by the batch's sha256 before one is made, and the
    predictions file, which marks the batch done, is written last."""
    log = get_run_logger()
    path = Path(batch)
    schema = batches.schema_of(Path(champion.prepared))
    try:
        df = batches.validate_batch(root, path, schema, params.limits, params.data.index_column)
    except DataValidationError as err:
        moved, _ = batches.quarantine(root, path, str(err), params.limits)
        log.error("quarantined %s: %s", path.name, err)
        return Scored(path.name, False, reason=str(err), quarantined=str(moved or ""))
    pred = predict(champion.session(), df[schema["features"]].to_numpy(dtype="float32"))
    labelled = schema["target"] in df.columns
    client, exp = ledger.connect_monitoring(root, params)
    out = batches.predictions_path(path)
    predicted = [schema["labels"][i] for i in pred]
    figures = ledger.scored_figures(predicted, df[schema["target"]].tolist() if labelled else None)
    run_id = ledger.record_score(client, exp, path, out, len(df), labelled, champion.version, sha256(path),
                                  {vocab.FLOW_RUN: str(runtime.flow_run.id), vocab.OWNER: owner()}, figures)
    batches.write_predictions(path, pred, schema["labels"], champion.version)
    log.info("scored %s: %d rows%s with v%s -> %s", path.name, len(df), " (labelled)" if labelled else "",
             champion.version, out.name)
    checkpoint("mid-scoring")
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
            f"{len(bad)} batch(es) quarantined in {params.limits.quarantine_dir} (reason files beside them); the other "
            f"{len(results) - len(bad)} were scored and the champion is unchanged:\n"
            + "\n".join(f"- {r.batch}: {r.reason}" for r in bad)
            + "\nFix the file(s) and put them back in " + params.score.incoming + " to score them.")
    return results
