"""Manual registry tasks for the Prefect UI: gate and promote a chosen version, roll back the champion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact

from ottimo import vocab
from ottimo.card import store as cardstore
from ottimo.config import Params
from ottimo.data.tables import load_splits
from ottimo.onnx.measure import accuracy
from ottimo.registry import gate as gate_policy
from ottimo.registry import promotion, versions
from ottimo.registry.promotion import PromotionError
from ottimo.registry.security import fetch_verified
from ottimo.registry.tracking import connect, work_dir


@dataclass(frozen=True)
class ManualVerdict:
    version: str
    passed: bool
    reasons: list[str]
    champion: str | None = None  # the champion it was judged against: the promotion is compare-then-set on it


def _accuracy(path: Path, prepared: Path) -> float:
    splits = load_splits(prepared)
    return accuracy(path, splits.X_test, splits.y_test)


@task
def gate_version(root: Path, params: Params, version: str) -> ManualVerdict:
    """The gate on a registered version: its accuracy and the champion's on the current test split (both ONNX
    files sha256-verified), its logged p95 latency and size, its stored model card's figures."""
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    if not str(version).isdigit():
        raise ValueError(f"version must be a version number of {name}, got {version!r}")
    mv = versions.version(client, name, str(version))
    prepared = root / "data" / "prepared"
    if not (prepared / "schema.json").is_file():
        prepared = cardstore.prepared_for(root, vocab.tag(mv.tags, vocab.DATA_REVISION, ""))
    path, _ = fetch_verified(client, name, mv.version, work_dir(root, f"serving-v{mv.version}"))
    run = client.get_run(mv.run_id).data.metrics
    metrics = {"accuracy": _accuracy(path, prepared), "p95_ms": run.get("test_p95_ms", float("inf")),
               "size_mb": run.get("test_size_mb", float("inf"))}
    champ = versions.alias_version(client, name, versions.CHAMPION)
    champion_accuracy = None
    if champ is not None:
        cpath, _ = fetch_verified(client, name, champ.version, work_dir(root, f"serving-v{champ.version}"))
        champion_accuracy = _accuracy(cpath, prepared)
    card = cardstore.load_stored(client, mv)
    same_data = champ is not None and (vocab.tag(mv.tags, vocab.DATA_REVISION)
                                       == vocab.tag(champ.tags, vocab.DATA_REVISION))  # gate.min_gain applies
    verdict = gate_policy.check(metrics, params.gate, champion_accuracy, card.figures() if card else None,
                                same_data=same_data)
    get_run_logger().info("gate on %s v%s: %s", name, mv.version, verdict.summary)
    return ManualVerdict(str(mv.version), verdict.passed, verdict.reasons, str(champ.version) if champ else None)


@task
def promote_manually(root: Path, params: Params, verdict: ManualVerdict, force: bool, reason: str) -> dict[str, str]:
    """Move the aliases (champion -> previous-champion, version -> champion) when the gate passed or `force`
    with a reason; tag who and why on the version. Raises GateFailed otherwise, changing nothing. The move is
    the pipeline's (ottimo.registry.promotion): locked, journaled, refused if the champion changed since the gate
    ran."""
    name = params.mlflow.registered_model
    if not verdict.passed and not force:
        raise gate_policy.GateFailed(f"{name} v{verdict.version} fails the gate: {'; '.join(verdict.reasons)}. "
                                     "Nothing changed; run again with force=true and a reason to override.")
    client, _ = connect(root, params.mlflow)
    after = promotion.promote(client, name, verdict.version, verdict.champion, params.reliability.lock_timeout_seconds,
                             gate=False)  # this flow ran the gate itself (or was forced); the sha256 is still required
    client.set_model_version_tag(name, verdict.version, "promoted_manually",
                                 ("FORCED past a failed gate: " if not verdict.passed else "gate passed: ")
                                 + (reason or "no reason given"))
    get_run_logger().info("%s v%s promoted by hand%s; aliases now %s", name, verdict.version,
                          " (forced)" if not verdict.passed else "", after)
    return after


@task
def rollback_manually(root: Path, params: Params, reason: str) -> dict[str, str]:
    """Swap champion and previous-champion (ottimo.registry.promotion: locked, journaled, compare-then-set on the
    champion read here); with no previous-champion, or a champion moved meanwhile, publish an alert and fail (no
    change)."""
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    champion = versions.aliases(client, name).get(versions.CHAMPION)
    try:
        after = promotion.rollback(client, name, f"manual: {reason}", champion, f"flow-run {runtime.flow_run.id}",
                                  params.reliability.lock_timeout_seconds)
    except (promotion.NoPreviousChampion, PromotionError) as err:
        create_markdown_artifact(markdown=f"# ALERT: rollback not done\n\n{err}", key="rollback-alert",
                                 description="Rollback refused: nothing changed")
        raise
    get_run_logger().warning("ROLLBACK (manual: %s): aliases now %s", reason, after)
    return after
