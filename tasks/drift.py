"""Drift-check tasks: gather the window of scored batches, measure drift and quality with Evidently, decide,
and carry out the decision (new training data under DVC, or a rollback), every step recorded in MLflow."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact

from ottimo import vocab
from ottimo.config import DataCfg, Params
from ottimo.data import batches, inputs, versioning
from ottimo.data import labels as label_rules
from ottimo.data.intake import DataValidationError
from ottimo.data.tables import index_column, materialise_raw, read_table, validate_frame, write_table
from ottimo.monitor import drift as policy
from ottimo.monitor import holdback, ledger
from ottimo.onnx.measure import predict, scores
from ottimo.ops.doctor import owner
from ottimo.ops.faults import checkpoint
from ottimo.registry import promotion, versions
from ottimo.registry.security import fetch_verified, serving_session
from ottimo.registry.tracking import connect, flatten, set_run_tags, stamped, work_dir
from tasks.score import Champion


@dataclass(frozen=True)
class Window:
    batches: list[str]  # scored batch files no drift check has decided on, oldest first
    score_runs: list[str]  # their MLflow score runs
    rows: int


@dataclass(frozen=True)
class Check:
    run_id: str  # the drift-check run in the monitoring experiment
    action: str  # nothing | retrain | rollback | insufficient data
    reasons: list[str]
    evidence: dict
    champion: str


@dataclass(frozen=True)
class CheckSummary:
    run_id: str
    action: str
    reasons: list[str]
    evidence: dict
    outcome: dict[str, str] = field(default_factory=dict)  # what the action did: new revision, champion, ...


@task
def collect_window(root: Path, params: Params) -> Window:
    """The scored batches since the last decided check (a missing batch file is skipped with a warning)."""
    log = get_run_logger()
    client, exp = ledger.connect_monitoring(root, params)
    paths, runs, rows = [], [], 0
    for run in ledger.unchecked(client, exp):
        path = Path(run.data.tags["batch.path"])
        if not path.is_file():
            log.warning("scored batch %s is gone; left out of the window", path)
            continue
        paths.append(str(path))
        runs.append(run.info.run_id)
        rows += int(run.data.metrics.get("rows", 0))
    log.info("window: %d batch(es), %d rows", len(paths), rows)
    return Window(paths, runs, rows)


LABELS_DIR = "labels"  # under score.incoming: late labels, `batch,row,<target>` (CSV or Parquet); not scored


@dataclass(frozen=True)
class LateLabels:
    attached: int  # labelled rows attached to scored batches
    rejected: list[str] = field(default_factory=list)  # "<file>: <reason>" for each file moved to the quarantine


class LabelsRejected(ValueError):
    """Late labels named a class the champion does not know; their file was quarantined, the check went on."""


def _known_labels(late: pd.DataFrame, target: str, source: str, classes: list | None) -> None:
    """Late labels (the rows that carry one) must be of the champion's classes: DataValidationError otherwise."""
    given = late[target].dropna()
    if classes is not None and len(given):
        label_rules.check_known(label_rules.clean(given, target, source), target, source, classes,
                           " (the champion was trained on these alone); fix the file and put it back")


@task
def attach_late_labels(root: Path, params: Params, classes: list | None = None) -> LateLabels:
    """Labels that came after scoring (files in <score.incoming>/labels/ with columns batch, row and the target,
    naming rows of scored batches): the realized accuracy of the predictions made then replaces the estimate on
    the score run and on the drift check that judged the batch. Each file is read once (moved to labels/done/);
    rows naming an unknown batch or row are skipped with a warning. A file with a label outside `classes` (the
    champion's) is moved to the quarantine with its reason, never read as a new class. Returns what was attached
    and what was rejected."""
    log = get_run_logger()
    folder = root / params.score.incoming / LABELS_DIR
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in (".csv", ".parquet")) \
        if folder.is_dir() else []
    if not files:
        return LateLabels(0)
    client, exp = ledger.connect_monitoring(root, params)
    target, attached, rejected = params.data.target, 0, []
    for path in files:
        late = read_table(path)
        missing = {"batch", "row", target} - set(late.columns)
        if missing:
            log.warning("late labels %s lack column(s) %s: skipped", path.name, sorted(missing))
            continue
        try:
            _known_labels(late, target, f"late labels {path.name}", classes)
        except DataValidationError as err:
            moved, _ = batches.quarantine(root, path, str(err), params.limits)
            log.error("quarantined %s: %s", path.name, err)
            rejected.append(f"{err} (moved to {params.limits.quarantine_dir}/{moved.name if moved else path.name})")
            continue
        for name, part in late.dropna(subset=[target]).groupby("batch"):
            run = ledger.score_run_of(client, exp, str(name))
            pred_path = Path(run.data.tags.get("predictions.path", "")) if run else None
            if pred_path is None or not pred_path.is_file():
                log.warning("late labels %s name batch %s, which has no scored predictions: skipped", path.name, name)
                continue
            made = pd.read_parquet(pred_path)["prediction"].to_numpy()
            correct, labelled = policy.realized(made, part["row"].to_numpy(), part[target].to_numpy())
            if labelled < len(part):
                log.warning("late labels %s: %d row(s) of %s are not in the batch: skipped", path.name,
                            len(part) - labelled, name)
            check = ledger.record_realized(client, exp, run, correct, labelled)
            attached += labelled
            log.info("late labels for %s: realized accuracy %.4f on %d rows%s", name, correct / max(labelled, 1),
                     labelled, f" (drift check {check} updated)" if check else "")
        done = folder / "done"
        done.mkdir(exist_ok=True)
        path.replace(done / path.name)
    return LateLabels(attached, rejected)


def _predictor(sess, features: list[str], labels: list[int]) -> policy.Predict:
    """Rows -> the class labels a session predicts for them."""
    return lambda rows: np.asarray(labels)[predict(sess, rows[features].to_numpy(dtype="float32"))]


def _scorer(sess, features: list[str]) -> policy.Proba:
    """Rows -> the session's class scores (logits or probabilities), for the estimate without labels."""
    return lambda rows: scores(sess, rows[features].to_numpy(dtype="float32"))


def _previous(root: Path, params: Params, features: list[str],
              labels: list[int]) -> tuple[policy.Predict | None, policy.Proba | None]:
    """previous-champion as a predictor and a scorer, or (None, None) without one; its ONNX file is fetched and
    verified when it is first asked (once: both share the session)."""
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    prev = versions.alias_version(client, name, versions.PREVIOUS)
    if prev is None:
        return None, None
    opened: list = []

    def sess():
        if not opened:
            path, mv = fetch_verified(client, name, prev.version, work_dir(root, f"serving-v{prev.version}"))
            opened.append(serving_session(path, mv.tags["sha256"]))
        return opened[0]

    return (lambda rows: _predictor(sess(), features, labels)(rows)), (lambda rows: _scorer(sess(), features)(rows))


@task
def check_window(root: Path, params: Params, champion: Champion, window: Window) -> Check:
    """Evidently data drift + prediction drift on the window against the champion's reference split, quality on
    labelled rows (champion, and previous-champion for rollback), then the policy; all logged to one MLflow run
    (HTML reports, summary.json, metrics, tag `decision`). A check on this same window that a dead process
    decided and never closed is taken up again instead (one decision per window, never a second retrain)."""
    log = get_run_logger()
    client, exp = ledger.connect_monitoring(root, params)
    key = ledger.window_key(window.score_runs)
    if (left := ledger.open_check(client, exp, key)) is not None:
        log.warning("drift check %s on this window was decided (%s) but never carried out: carrying it out now",
                    left.info.run_id, left.data.tags["decision"])
        return _resume(client, left)
    cfg = params.drift
    prepared = Path(champion.prepared)
    schema = batches.schema_of(prepared)
    features, target, labels = schema["features"], schema["target"], schema["labels"]
    out = work_dir(root, "drift") / str(runtime.flow_run.id)
    out.mkdir(parents=True, exist_ok=True)
    reference = pd.read_parquet(prepared / "reference.parquet")
    enough = window.rows >= cfg.min_rows
    cur = batches.window([Path(b) for b in window.batches], schema) if enough else None
    rows = len(cur) if enough else window.rows
    sess = champion.session()  # sha256 checked again
    previous, previous_scores = _previous(root, params, features, labels) if enough else (None, None)
    found = policy.assess(reference, cur, rows, features, target, cfg, _predictor(sess, features, labels),
                          previous, _scorer(sess, features), previous_scores, spec=inputs.spec_of(schema))
    ev = found.evidence
    files = [policy.save_html(snap, out / f"{name}.html") for name, snap in found.reports.items()]
    has_previous = versions.alias_version(client, params.mlflow.registered_model, versions.PREVIOUS) is not None
    decision = policy.decide(ev, cfg, has_previous, ledger.in_cooldown(client, exp, cfg.cooldown_hours))
    summary = {"decision": decision.action, "reasons": decision.reasons, "champion": champion.version,
               "data_revision": champion.data_revision, "batches": [Path(b).name for b in window.batches],
               "evidence": ev.as_dict(), "policy": cfg.model_dump()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    from tasks.train import flow_run_url  # the flow run's Prefect page (None on the ephemeral API)

    url = flow_run_url()
    run = client.create_run(exp, run_name=f"drift-check: {decision.action.upper()}", tags={
        **({vocab.FLOW_RUN_URL: url} if url else {}),
        vocab.NOTE: vocab.clip(f"**{decision.action.upper()}** on {ev.rows} rows from {len(window.batches)} "
                               f"batch(es), champion v{champion.version}."
                               + (f" Prefect: [flow run]({url})." if url else "") + "\n\n"
                               + "\n".join(f"- {r}" for r in decision.reasons)),
        vocab.KIND: vocab.CHECK, "decision": decision.action, "reasons": vocab.clip("; ".join(decision.reasons)),
        "champion": champion.version, vocab.DATA_REVISION: champion.data_revision,
        vocab.FLOW_RUN: str(runtime.flow_run.id), "batches": vocab.clip(",".join(Path(b).name for b in window.batches)),
        vocab.WINDOW: key, vocab.CLOSED: "false", vocab.OWNER: owner()})  # owner: the doctor tells a killed flow run
    numbers = {k: float(v) for k, v in ev.as_dict().items() if isinstance(v, int | float) and v is not None}
    source = policy.quality_source(ev, cfg)
    client.log_batch(run.info.run_id,  # one request (MLflow splits it at its per-request limits)
                     params=[Param(k, v) for k, v in flatten({"drift": cfg.model_dump()}).items()],
                     metrics=stamped(numbers),
                     tags=[RunTag(vocab.QUALITY_SOURCE, source or "none")])
    for path in files + [out / "summary.json"]:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("drift check on %d rows: %s (%s)", ev.rows, decision.action.upper(), "; ".join(decision.reasons))
    checkpoint("mid-drift-check")
    return Check(run.info.run_id, decision.action, decision.reasons, ev.as_dict(), champion.version)


def _resume(client, run) -> Check:
    """The Check of a decided, unclosed drift-check run, read back from its tags and summary.json."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", tmp)).read_text())
    return Check(run.info.run_id, summary["decision"], summary["reasons"], summary["evidence"], summary["champion"])


APPEND = "append"  # the step of a drift check's ACTING marker that appends labelled rows to the training data


@task
def add_training_data(root: Path, params: Params, window: Window, check_id: str = "",
                      accept_drifted: bool = False) -> dict[str, str]:
    """Append the window's labelled rows to the training data file and version it with DVC (`dvc add`,
    `dvc repro prepare`); return the data revision (unchanged when no row was labelled) and the rows added.
    Rows that fail the training data's value checks or lie far outside its range (drift.holdback_margin) are held
    back (written to limits.quarantine_dir with their reasons), unless `accept_drifted` or drift.accept_drifted_rows.

    Resumable: the check run's ACTING marker records the file's row count and sha256 before the append and the
    outcome; a rerun of the same check after a crash finds it and appends nothing twice (a file that changed since
    the marker was written already holds the rows: only its DVC versioning is redone)."""
    log = get_run_logger()
    cfg = params.data
    raw = materialise_raw(root, cfg)
    client, _ = ledger.connect_monitoring(root, params)
    check_id = check_id if check_id and _is_run(client, check_id) else ""  # "": no check run to resume from
    marker = ledger.acting(client, check_id).get(APPEND) if check_id else None
    if marker is not None and (marker.get("done") or _digest(raw) != marker["sha256_before"]):
        log.warning("drift check %s appended its %s row(s) before it was stopped: not appending them again",
                    check_id, marker["outcome"]["rows_added"])
        if marker.get("done"):
            return {"data_revision": marker["data_revision"]} | marker["outcome"]
        return _version_data(root, params, client, check_id, marker["outcome"])
    old = index_column(read_table(raw, cfg.target, cfg.input.kind), raw, cfg.index_column)  # data.index_column
    schema = _training_schema(old, cfg, raw)
    frames = [f for f in (batches.read_batch(Path(b), schema) for b in window.batches) if cfg.target in f.columns]
    versioning.ensure_repo(root)
    if not frames:
        log.warning("no labelled rows in the window: the training data is unchanged")
        versioning.track(root, cfg.path)
        versioning.reproduce(root)
        return {"data_revision": versioning.revision(root), "rows_added": "0"}
    rows = pd.concat([f.reindex(columns=old.columns).dropna(subset=[cfg.target]) for f in frames], ignore_index=True)
    outcome: dict[str, str] = {}
    held = None
    if not (accept_drifted or params.drift.accept_drifted_rows):
        known = label_rules.classes(old[cfg.target], cfg.labels)
        parts = holdback.split(rows, old, schema["features"], cfg.target, known, params.drift.holdback_margin,
                               params.limits.max_abs_value, inputs.spec_of(schema))
        if len(parts.held):
            held = parts.held
            outcome = {"rows_held_back": str(len(parts.held)), "held_back": vocab.clip("; ".join(parts.summary), 2000),
                       "held_back.path": str(_held_path(root, params, check_id or "window"))}
            log.warning("%d labelled row(s) held back from the training data: %s (accept them with "
                        "drift.accept_drifted_rows or `ottimo drift-check --accept-drifted`)", len(parts.held),
                        "; ".join(parts.summary))
        rows = parts.kept
    else:
        outcome = {"rows_held_back": "0 (accepted explicitly)"}
    new = validate_frame(pd.concat([old, rows], ignore_index=True), cfg, raw)
    outcome = {"rows_added": str(len(new) - len(old))} | outcome
    if check_id:  # the marker first: from here on a rerun must not append these rows again
        ledger.act(client, check_id, APPEND, rows_before=len(old), sha256_before=_digest(raw), outcome=outcome)
    if held is not None:
        held.to_parquet(outcome["held_back.path"], index=False)
    _write_atomically(new, raw, cfg)
    checkpoint("after-appending-rows")
    log.info("training data %s: %d -> %d rows", cfg.path, len(old), len(new))
    return _version_data(root, params, client, check_id, outcome)


def _version_data(root: Path, params: Params, client, check_id: str, outcome: dict[str, str]) -> dict[str, str]:
    """`dvc add` the training data and `dvc repro prepare` (both idempotent), mark the append step done."""
    versioning.track(root, params.data.path)
    versioning.reproduce(root)
    rev = versioning.revision(root)
    get_run_logger().info("training data versioned: data revision %s", rev[:12])
    if check_id:
        ledger.act(client, check_id, APPEND, done=True, data_revision=rev)
    return {"data_revision": rev} | outcome


def _is_run(client, run_id: str) -> bool:
    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomically(df: pd.DataFrame, path: Path, cfg: DataCfg) -> None:
    """Write the table beside `path` and rename it over: a crash leaves the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_table(df, tmp, cfg, suffix=path.suffix)
    os.replace(tmp, path)


def _training_schema(old: pd.DataFrame, cfg: DataCfg, raw: Path) -> dict:
    """The training data's features, target and input spec (what .npz batches are read as, rows ranged by)."""
    features = [c for c in old.columns if c != cfg.target]
    spec = inputs.derive_spec(inputs.input_of(cfg), features, old[features], raw)
    return {"features": features, "target": cfg.target, "input": spec.as_dict()}


def _held_path(root: Path, params: Params, name: str) -> Path:
    """Where held-back rows go: `<quarantine>/heldback-<check run>.parquet`, each with its reason (column)."""
    folder = root / params.limits.quarantine_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"heldback-{name}.parquet"




def retrain_state(root: Path, params: Params, check_id: str) -> dict[str, str] | None:
    """What a retrain this drift check started before it was stopped came to: its outcome when the training
    pipeline finished (it records it), its flow run when one was started through a deployment; None: start one
    (none was started, or a subflow retrain died with the process and must run again)."""
    client, _ = ledger.connect_monitoring(root, params)
    state = ledger.acting(client, check_id).get(ledger.RETRAIN)
    if not state:
        return None
    if state.get("outcome"):
        get_run_logger().warning("drift check %s: its retrain finished before it was stopped (%s); not again",
                                 check_id, state["outcome"])
        return state["outcome"]
    if state.get("flow_run"):
        get_run_logger().warning("drift check %s: its retrain was started (flow run %s); not again", check_id,
                                 state["flow_run"])
        return {"training": "started", "training_flow_run": state["flow_run"]}
    return None


def start_retrain(root: Path, params: Params, check_id: str, flow_run: str | None) -> dict[str, str]:
    """Mark the retrain step started on the drift-check run (with the deployment's flow run, when there is one)."""
    client, _ = ledger.connect_monitoring(root, params)
    ledger.act(client, check_id, ledger.RETRAIN, started=True, **({"flow_run": flow_run} if flow_run else {}))
    if flow_run:
        client.set_tag(check_id, vocab.OUTCOME_TRAINING, "started")
    return {"training": "started", "training_flow_run": flow_run} if flow_run else {}


@task
def rollback_champion(root: Path, params: Params, check: Check) -> dict[str, str]:
    """Swap champion and previous-champion back (tagged on both versions, with the check run as evidence), if the
    champion is still the one the check judged; done already by this check (a rerun after a crash): no change."""
    client, _ = connect(root, params.mlflow)
    reason = f"drift check {check.run_id}: " + "; ".join(check.reasons)
    after = promotion.rollback(client, params.mlflow.registered_model, reason, check.champion,
                              f"drift-check {check.run_id}", params.reliability.lock_timeout_seconds)
    get_run_logger().warning("ROLLBACK: champion v%s -> v%s; aliases now %s", check.champion,
                             after[versions.CHAMPION], after)
    return after


@task
def close_check(root: Path, params: Params, check: Check, window: Window, outcome: dict[str, str]) -> CheckSummary:
    """Record what the decision did on the check run, mark the window's batches as decided (not after
    "insufficient data": they wait for more rows), publish the check as a Prefect markdown artifact."""
    client, _ = ledger.connect_monitoring(root, params)
    tags = {vocab.OUTCOME + key: vocab.clip(str(value)) for key, value in outcome.items()}
    if outcome.get("rows_held_back", "0").split()[0] != "0":
        check = replace(check, reasons=check.reasons + [
            f"{outcome['rows_held_back']} labelled row(s) held back from the training data ({outcome['held_back']}; "
            f"kept in {outcome['held_back.path']}); accept them with drift.accept_drifted_rows or --accept-drifted"])
        tags |= {"reasons": vocab.clip("; ".join(check.reasons)), vocab.HELD_BACK: outcome["rows_held_back"]}
    set_run_tags(client, check.run_id, tags)
    if check.action != policy.INSUFFICIENT:
        ledger.mark_checked(client, window.score_runs, check.run_id)
    client.set_tag(check.run_id, vocab.CLOSED, "true")
    ev = check.evidence
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# Drift check: **{check.action.upper()}**", "",
             f"Champion v{check.champion}; window of {ev['rows']} rows from {len(window.batches)} batch(es); "
             f"MLflow run `{check.run_id}` in `{ledger.experiment_name(params)}` (drift_report.html, "
             "quality_report.html, summary.json).", "", *[f"- {r}" for r in check.reasons], "",
             "| evidence | value |", "| --- | --- |"]
    lines += [f"| {k} | {fmt(ev.get(k))} |" for k in ("drifted_columns", "columns", "drift_share", "dataset_drift",
              "multivariate_ratio", "multivariate_threshold", "multivariate_drift",
              "prediction_drift_score", "prediction_drift", "labelled_rows", "accuracy", "reference_accuracy",
              "previous_accuracy", "estimated_accuracy", "estimate_low", "estimate_high", "estimate_alarm",
              "estimated_previous_accuracy")]
    if ev.get("drifted"):
        lines += ["", "Drifted columns: " + ", ".join(ev["drifted"][:30])]
    if outcome:
        lines += ["", "Outcome: " + "; ".join(f"{k} = {v}" for k, v in outcome.items())]
    create_markdown_artifact(markdown="\n".join(lines), key="drift-check",
                             description=f"Drift check decision: {check.action}")
    return CheckSummary(check.run_id, check.action, check.reasons, check.evidence, outcome)
