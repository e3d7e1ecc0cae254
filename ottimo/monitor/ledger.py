"""Monitoring records in MLflow: one run per scored batch and one per drift check, in `<experiment>-monitoring`.

The score runs are the ledger of what production scored; a drift check takes the ones it has not seen yet
as its window and marks them with its own run id once it has decided.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunTag

from ottimo import vocab
from ottimo.config import Params
from ottimo.registry.tracking import connect, set_run_tags, stamped


def experiment_name(params: Params) -> str:
    return params.drift.experiment or f"{params.mlflow.experiment}-monitoring"


def connect_monitoring(root: Path, params: Params) -> tuple[MlflowClient, str]:
    """A client and the monitoring experiment id (created on first use, artifacts beside the main ones; marked
    classic ML like the main one, by connect)."""
    return connect(root, params.mlflow.model_copy(update={"experiment": experiment_name(params)}))


METRIC_UNSAFE = re.compile(r"[^\w\-. :]")  # what an MLflow metric name may not hold (a slash: a path)


def scored_figures(predicted: list, labels: list | None = None) -> dict[str, float]:
    """What a batch's scoring says in numbers: rows, the predicted class distribution (`predicted.<class>`, a
    share of the rows) and, for the rows that carry a label (`labels`, None where missing), `labelled_rows` and
    `accuracy`."""
    n = len(predicted)
    out: dict[str, float] = {"rows": float(n)}
    for cls, count in sorted(Counter(map(str, predicted)).items()):
        out[f"predicted.{METRIC_UNSAFE.sub('_', cls)}"] = count / n if n else 0.0  # a text class as a metric name
    if labels is not None:
        pairs = [(p, y) for p, y in zip(predicted, labels, strict=True) if y is not None and y == y]  # not NaN
        out["labelled_rows"] = float(len(pairs))
        if pairs:
            out["accuracy"] = sum(str(p) == str(int(y) if isinstance(y, float) else y) for p, y in pairs) / len(pairs)
    return out


def record_score(client: MlflowClient, exp: str, batch: Path, predictions: Path, rows: int, labelled: bool,
                 version: str, batch_sha256: str, tags: dict[str, str],
                 figures: dict[str, float] | None = None) -> str:
    """One finished run for a scored batch; it waits in the next drift window (drift.checked = false). A run for
    the same file and content made by a process that died before it wrote the predictions is reused (no double).
    `figures` (scored_figures: class distribution, accuracy on labelled rows) are logged beside `rows`."""
    same = f"tags.`{vocab.KIND}` = '{vocab.SCORE}' and tags.`batch.sha256` = '{batch_sha256}'"
    for old in client.search_runs([exp], same, max_results=100):
        if old.data.tags.get("batch.path") == str(batch):
            if old.info.status != "FINISHED":
                client.log_metric(old.info.run_id, "rows", rows)
                client.set_terminated(old.info.run_id, "FINISHED")
            return old.info.run_id
    run = client.create_run(exp, run_name=f"score {batch.name} ({rows} rows, v{version})", tags={
        vocab.KIND: vocab.SCORE, "batch": batch.name, "batch.path": str(batch), "batch.sha256": batch_sha256,
        "predictions.path": str(predictions), "model.version": str(version), "labelled": str(labelled).lower(),
        vocab.CHECKED: "false", **tags})
    client.log_batch(run.info.run_id, metrics=stamped({**(figures or {}), "rows": rows}))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def unchecked(client: MlflowClient, exp: str) -> list:
    """Score runs no drift check has decided on yet, oldest first."""
    return client.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.SCORE}' and tags.`{vocab.CHECKED}` = 'false'",
                              order_by=["attributes.start_time ASC"], max_results=10_000)




def window_key(score_run_ids: list[str]) -> str:
    """A short hash naming a window by its score runs (the same batches give the same key)."""
    return hashlib.sha256(",".join(sorted(score_run_ids)).encode()).hexdigest()[:16]


def open_check(client: MlflowClient, exp: str, key: str):
    """A drift-check run on this very window whose decision was never carried out and closed (its process died
    in between), or None: a rerun takes that decision instead of deciding again."""
    runs = client.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.CHECK}' and tags.`{vocab.WINDOW}` = '{key}' "
                              f"and tags.`{vocab.CLOSED}` = 'false'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def mark_checked(client: MlflowClient, score_run_ids: list[str], check_run_id: str) -> None:
    for run_id in score_run_ids:
        client.set_tag(run_id, vocab.CHECKED, check_run_id)


def acting(client: MlflowClient, check_run_id: str) -> dict[str, dict]:
    """What a drift check has done so far to carry out its decision, step by step ({} before it started)."""
    return json.loads(client.get_run(check_run_id).data.tags.get(vocab.ACTING) or "{}")


def act(client: MlflowClient, check_run_id: str, step: str, **state) -> dict:
    """Record a step of carrying out a drift check's decision (before it, and again when done), so a rerun after
    a crash resumes from it instead of acting twice. Returns the step's state."""
    steps = acting(client, check_run_id)
    steps[step] = steps.get(step, {}) | state
    client.set_tag(check_run_id, vocab.ACTING, json.dumps(steps))
    return steps[step]


RETRAIN = "retrain"  # the ACTING step of a retrain: the flow run started, then (by the pipeline) its outcome


def record_retrain(client: MlflowClient, check_run_id: str, training: str, champion: str | None = None,
                   message: str | None = None) -> dict[str, str]:
    """The training pipeline a drift check started, as it ends: its outcome (completed | skipped | failed) and
    champion on the check run, as outcome.training / outcome.champion and in its ACTING marker (a rerun of the check
    finds it)."""
    outcome = {"training": training} | ({"champion": str(champion)} if champion else {}) | (
        {"message": vocab.clip(message, 1000)} if message else {})
    act(client, check_run_id, RETRAIN, done=True, outcome=outcome)
    set_run_tags(client, check_run_id, {vocab.OUTCOME + key: vocab.clip(value) for key, value in outcome.items()})
    return outcome


def last_check(client: MlflowClient, exp: str, decision: str | None = None):
    """The newest drift-check run (with that decision when given), or None."""
    where = f"tags.`{vocab.KIND}` = '{vocab.CHECK}'" + (f" and tags.decision = '{decision}'" if decision else "")
    runs = client.search_runs([exp], where, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def in_cooldown(client: MlflowClient, exp: str, hours: float, now: datetime | None = None) -> bool:
    """Whether a retrain was decided less than `hours` ago."""
    run = last_check(client, exp, "retrain")
    if run is None or hours <= 0:
        return False
    started = datetime.fromtimestamp(run.info.start_time / 1000, UTC)
    return (now or datetime.now(UTC)) - started < timedelta(hours=hours)


def score_run_of(client: MlflowClient, exp: str, batch_name: str):
    """The newest score run of the batch file named `batch_name`, or None."""
    runs = client.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.SCORE}' and tags.batch = '{batch_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def record_realized(client: MlflowClient, exp: str, score_run, correct: int, labelled: int) -> str | None:
    """Late labels for a scored batch: its realized accuracy on the score run and, when a drift check already
    judged that batch, on the check run too (over all of its batches with late labels): metric `accuracy` and
    `accuracy_realized` replace the estimate, tag quality.source = realized. Returns the check run id or None."""
    run_id, now = score_run.info.run_id, int(time.time() * 1000)  # after the check's estimate: these replace it
    client.log_batch(run_id, metrics=stamped({"realized_correct": correct, "realized_labelled_rows": labelled},
                                             now=now),
        tags=[RunTag(vocab.ACCURACY_REALIZED, f"{correct / labelled:.6f}" if labelled else "none")])
    check = client.get_run(run_id).data.tags.get(vocab.CHECKED, "false")
    if check == "false":
        return None
    scored = client.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.SCORE}' and tags.`{vocab.CHECKED}` = "
                                f"'{check}'", max_results=10_000)
    hits = sum(int(r.data.metrics.get("realized_correct", 0)) for r in scored)
    rows = sum(int(r.data.metrics.get("realized_labelled_rows", 0)) for r in scored)
    if rows:
        client.log_batch(check, metrics=stamped({"accuracy": hits / rows, "accuracy_realized": hits / rows,
                                                 "realized_labelled_rows": rows}, now=now),
            tags=[RunTag(vocab.QUALITY_SOURCE, "realized")])
    return check
