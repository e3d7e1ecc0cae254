"""Registry tasks: register every candidate, gate them, promote the selected one by moving aliases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger, task

from ottimo import vocab
from ottimo.config import Params
from ottimo.data import labels
from ottimo.ops.faults import checkpoint
from ottimo.registry import gate as gate_policy
from ottimo.registry import promotion, runkey, security
from ottimo.registry.promotion import PromotionError
from ottimo.registry.runkey import Novelty, RunKey
from ottimo.registry.tracking import connect, set_run_tags, work_dir
from ottimo.registry.versions import CHALLENGER, CHAMPION, alias_version, aliases, register
from tasks.retry import RETRY_TRANSIENT

if TYPE_CHECKING:  # annotations only: a promotion alone need not import the training stack
    from tasks.data import DataVersion
    from tasks.evaluate import Evaluated


@dataclass(frozen=True)
class GateDecision:
    family: str
    version: str
    passed: bool
    reasons: list[str]
    verdicts: dict[str, str]  # family -> PASS, or FAIL with the thresholds missed, for every candidate
    expected_champion: str | None = None  # the champion the gate compared against: promote moves only if it still is


@task(**RETRY_TRANSIENT)  # reads and tags: the same again on a retry
def check_novelty(root: Path, params: Params, data: DataVersion, parent_run_id: str, force: bool = False
                  ) -> Novelty:
    """The run key (data revision, code and params fingerprints: ottimo.registry.runkey) tagged on the pipeline
    run, and whether it has anything new to train against the champion's key (`force`: train anyway)."""
    key = runkey.key_of(params, data.revision)
    client, _ = connect(root, params.mlflow)
    set_run_tags(client, parent_run_id, key.tags())
    champion = alias_version(client, params.mlflow.registered_model, CHAMPION)
    novelty = runkey.decide(key, champion.version if champion else None, champion.tags if champion else None,
                            force)
    get_run_logger().info("run key: data %s, code %s, params %s; %s", key.data_revision[:8], key.code[:8],
                          key.params[:8], novelty.message)
    return novelty


@task(task_run_name="register_candidate[{cand.family}]", **RETRY_TRANSIENT)  # idempotent: a retry finds its version
def register_candidate(root: Path, params: Params, cand: Evaluated, data: DataVersion, key: RunKey) -> str:
    """Register the candidate's ONNX model as a new version (once per run) tagged with its lineage and the run
    key it was made from."""
    client, _ = connect(root, params.mlflow)
    mv = register(client, params.mlflow.registered_model, cand.model_uri, cand.run_id, key.tags() | {
        "sha256": cand.sha256, vocab.FAMILY: cand.family,
        vocab.FAMILY_RUN: cand.model_family or cand.family,
        vocab.GATE_VERDICT: vocab.PENDING, vocab.CLASSES: labels.tag_of(data.prepared)})
    get_run_logger().info("%s registered as %s v%s", cand.family, params.mlflow.registered_model, mv.version)
    checkpoint("after-registering")
    return str(mv.version)


@task(**RETRY_TRANSIENT)  # tags and the challenger alias: same writes again; GateFailed is never retried
def gate(root: Path, params: Params, parent_run_id: str, candidates: list[Evaluated], versions: list[str],
         champion_accuracy: float | None, cards: list[dict[str, float]] | None = None,
         data: DataVersion | None = None, same_data: bool = True) -> GateDecision:
    """Check every candidate against the thresholds (and `gate.card` against its model-card figures, `cards`
    in the order of `candidates`; with `gate.no_slower_than_champion`, the p95 interval against the champion's,
    timed interleaved with it on `data`'s test rows), tag the verdicts, point `challenger` at the selected one.
    `same_data`: the candidates were trained on the champion's data revision, so they must beat it by
    gate.min_gain (Novelty.same_data).

    Raises GateFailed (so the flow run ends Failed) when the selected candidate does not pass;
    `champion` and `previous-champion` are then left as they were.
    """
    log = get_run_logger()
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    expected = aliases(client, name).get(CHAMPION)
    if (expected is None) != (champion_accuracy is None):
        raise PromotionError(f"champion of {name} changed while this run was evaluating (now "
                             f"{'v' + expected if expected else 'none'}); nothing was promoted. "
                             "Run the pipeline again.")
    figures = cards or [None] * len(candidates)
    speed = _no_slower(root, params, candidates, data) if params.gate.no_slower_than_champion and expected else {}
    verdicts = {c.family: (c.metrics, gate_policy.check(c.metrics, params.gate, champion_accuracy, f,
                                                        speed.get(c.family), same_data))
                for c, f in zip(candidates, figures, strict=True)}
    for c, version in zip(candidates, versions, strict=True):
        v = verdicts[c.family][1]
        client.set_model_version_tag(name, version, vocab.GATE_VERDICT, vocab.PASSED if v.passed else vocab.FAILED)
        client.set_model_version_tag(name, version, vocab.GATE_REASONS, vocab.clip("; ".join(v.reasons)))
        client.set_tag(c.run_id, vocab.GATE_VERDICT, vocab.clip(v.summary))
        log.info("gate %s v%s: %s", c.family, version, v.summary)
    chosen = gate_policy.select(verdicts)
    version = versions[[c.family for c in candidates].index(chosen)]
    client.set_registered_model_alias(name, CHALLENGER, version)
    verdict = verdicts[chosen][1]
    set_run_tags(client, parent_run_id, {vocab.GATE_VERDICT: vocab.PASSED if verdict.passed else vocab.FAILED,
                                         "gate.selected": f"{chosen} v{version}",
                                         vocab.GATE_REASONS: vocab.clip("; ".join(verdict.reasons))})
    if not verdict.passed:
        client.set_terminated(parent_run_id, "FAILED")
        raise gate_policy.GateFailed(
            f"gate failed for every candidate; best was {chosen} v{version}: {'; '.join(verdict.reasons)}. "
            "champion unchanged. Relax the thresholds under `gate:` in params.yaml or improve the model."
        )
    shorts = {k: v.short for k, (_, v) in verdicts.items()}
    return GateDecision(chosen, version, True, verdict.reasons, shorts, expected)


def _no_slower(root: Path, params: Params, candidates: list[Evaluated], data: DataVersion | None
               ) -> dict[str, tuple[bool, str]]:
    """gate.no_slower_than_champion: every candidate's ONNX file timed interleaved with the champion's (sha256
    checked) on evaluate.target; family -> `no_slower`'s (passed, reason) on their p95 intervals."""
    from ottimo.data.tables import load_splits  # the training stack only when this rule is on
    from ottimo.onnx import latency
    from ottimo.onnx.export import verify_sha256

    if data is None:
        raise ValueError("gate.no_slower_than_champion needs the data version to time the champion on")
    client, _ = connect(root, params.mlflow)
    champ, _ = security.fetch_verified(client, params.mlflow.registered_model, CHAMPION, work_dir(root, "champion"))
    paths = {c.family: verify_sha256(Path(c.onnx_path), c.sha256) for c in candidates} | {CHAMPION: champ}
    target = latency.targets(params.evaluate)[0]
    e = params.evaluate
    timed = latency.measure(paths, load_splits(Path(data.prepared)).X_test, target, e.runs, e.warmup, e.bootstrap)
    return {c.family: gate_policy.no_slower(timed[c.family].p95, timed[CHAMPION].p95, f"p95 ({target.name})")
            for c in candidates}


@task
def promote_selected(root: Path, params: Params, parent_run_id: str, decision: GateDecision) -> dict[str, str]:
    """champion -> previous-champion, the selected version -> champion, as one locked, journaled unit that
    happens only if the champion is still the one the gate compared against; close the pipeline run.
    Every attempt is recorded on the pipeline run (tag `promotion`)."""
    client, exp = connect(root, params.mlflow)
    was = decision.expected_champion
    try:
        after = promotion.promote(client, params.mlflow.registered_model, decision.version, was,
                                 params.reliability.lock_timeout_seconds)
    except PromotionError as err:
        client.set_tag(parent_run_id, "promotion", vocab.clip(f"refused v{decision.version}: {err}"))
        client.set_terminated(parent_run_id, "FAILED")
        raise
    set_run_tags(client, parent_run_id, {"promotion": f"promoted v{decision.version} (champion was "
                                                      f"{'v' + was if was else 'none'})",
                                         "champion": decision.version})
    for child in client.search_runs([exp], f"tags.`{vocab.PARENT}` = '{parent_run_id}' and "
                                    "attributes.status = 'RUNNING'"):  # candidates: done, not left RUNNING
        client.set_terminated(child.info.run_id, "FINISHED")
    client.set_terminated(parent_run_id, "FINISHED")
    get_run_logger().info("promoted %s v%s to champion; aliases now %s", decision.family, decision.version, after)
    return after
