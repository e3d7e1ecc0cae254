"""What a pipeline run says about itself in MLflow, passed or failed: a name that explains it, the gated
candidate's figures and the verdict as metrics (runs sort and chart over time), and a markdown description
(MLflow's run description) with what each candidate scored and why the gate decided as it did."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from mlflow import MlflowClient

from ottimo import vocab
from ottimo.config import Params
from ottimo.registry.tracking import stamped

FIGURES = ("accuracy", "macro_f1", "p50_ms", "p95_ms", "size_mb", "throughput_rps")  # as test_<name> on runs


@dataclass(frozen=True)
class Outcome:
    passed: bool | None  # None: the run failed before the gate decided
    gated: str | None = None  # the candidate the gate judged
    version: str | None = None  # its registered version
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)  # name, technique, test_<figure>..., verdict
    promoted_over: str | None = None  # the champion before (None: there was none)
    failure: str | None = None  # why the flow run failed, in words


def dataset_name(params: Params) -> str:
    return params.data.builtin or params.data.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def run_name(dataset: str, revision: str, outcome: Outcome, when: datetime | None = None) -> str:
    """e.g. `pipeline 2026-12-01 digits@cb8ef66 → v3 PASS`, `... → v4 FAIL`, `... → FAILED` (before the gate)."""
    when = when or datetime.now(UTC)
    verdict = {True: "PASS", False: "FAIL", None: "FAILED"}[outcome.passed]
    target = f"v{outcome.version} {verdict}" if outcome.version else verdict
    return f"pipeline {when:%Y-%m-%d} {dataset}@{revision[:7]} → {target}"


def skipped_name(dataset: str, revision: str, champion: str, when: datetime | None = None) -> str:
    """e.g. `pipeline 2026-12-01 digits@cb8ef66 → skipped, nothing new (v3)`: a run whose key was the champion's."""
    when = when or datetime.now(UTC)
    return f"pipeline {when:%Y-%m-%d} {dataset}@{revision[:7]} → skipped, nothing new (v{champion})"


def running_name(dataset: str, revision: str, when: datetime | None = None) -> str:
    """The pipeline run's name until it decides (then `run_name`)."""
    return f"pipeline {(when or datetime.now(UTC)):%Y-%m-%d} {dataset}@{revision[:7]} (running)"


def inherited(client: MlflowClient, parent_run_id: str | None) -> dict[str, str]:
    """The filterable tags a nested run (tuning, trial, compression) takes from its pipeline run: data revision,
    the pipeline's flow run id, the code commit, the code and params fingerprints."""
    if not parent_run_id:
        return {}
    tags = client.get_run(parent_run_id).data.tags
    out = {k: tags[k] for k in (vocab.DATA_REVISION, vocab.COMMIT, vocab.CODE_FINGERPRINT, vocab.PARAMS_FINGERPRINT)
           if k in tags}
    root = tags.get(vocab.ROOT_FLOW_RUN) or tags.get(vocab.FLOW_RUN)
    return out | ({vocab.ROOT_FLOW_RUN: root} if root else {})


def candidates(client: MlflowClient, exp: str, run_id: str) -> list[dict]:
    """Every trained and compressed candidate under a pipeline run with its test figures and verdict."""
    rows = []
    runs = client.search_runs([exp], f"tags.`{vocab.PARENT}` = '{run_id}'", order_by=["attributes.start_time ASC"],
                              max_results=1000)
    for r in runs:
        tags = r.data.tags
        if tags.get(vocab.KIND) not in (vocab.CANDIDATE, vocab.COMPRESSED):
            continue
        verdict = tags.get(vocab.GATE_VERDICT) or tags.get("compress.selection") or ""
        rows.append({"name": tags.get(vocab.CANDIDATE_NAME) or tags.get(vocab.FAMILY_RUN) or r.info.run_name,
                     "technique": tags.get(vocab.TECHNIQUE, "trained"), "run_id": r.info.run_id,
                     **{k: r.data.metrics[f"test_{k}"] for k in FIGURES if f"test_{k}" in r.data.metrics},
                     "verdict": verdict})
    return rows


def collect(client: MlflowClient, exp: str, run_id: str, failure: str | None = None) -> Outcome:
    """The outcome of a pipeline run read back from MLflow (what a failure hook has): the gate's tags on the
    pipeline run and the candidates under it."""
    tags = client.get_run(run_id).data.tags
    verdict = vocab.tag(tags, vocab.GATE_VERDICT)
    passed = {vocab.PASSED: True, vocab.FAILED: False}.get(verdict or "")
    gated, _, version = (tags.get(vocab.GATE_SELECTED) or "").rpartition(" v")
    reasons = [r for r in (vocab.tag(tags, vocab.GATE_REASONS) or "").split("; ") if r]
    return Outcome(passed, gated or None, version or None, reasons, candidates(client, exp, run_id),
                   failure=failure)


def _fmt(value: object, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float | int) else "–"


def markdown(outcome: Outcome, dataset: str, revision: str, flow_run_url: str | None = None,
             registered_model: str | None = None) -> str:
    """The run's description: the decision in one line, the reasons, every candidate's figures."""
    name = registered_model or "the model"
    if outcome.passed:
        was = f"v{outcome.promoted_over}" if outcome.promoted_over else "none"
        head = (f"**PASS: {outcome.gated} promoted to champion of {name} as v{outcome.version}** (champion was "
                f"{was}): it met every gate threshold.")
    elif outcome.passed is False:
        head = (f"**FAIL: nothing promoted**; the gate refused {outcome.gated or 'every candidate'}"
                f"{' v' + outcome.version if outcome.version else ''}. The champion is unchanged.")
    else:
        head = "**FAILED before the gate decided**; nothing promoted, the champion is unchanged."
    lines = [head, "", f"Data: `{dataset}` at DVC revision `{revision[:12]}`."  # first: the UI folds the rest
             + (f" Prefect: [flow run]({flow_run_url})." if flow_run_url else ""), ""]
    lines += [f"- {r}" for r in outcome.reasons]
    if outcome.failure:
        lines += ["", f"Failure: {vocab.clip(outcome.failure, 600)}"]
    if outcome.candidates:
        lines += ["", "| candidate | technique | accuracy | macro F1 | p50 ms | p95 ms | size MB | verdict |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {c['name']} | {c['technique']} | {_fmt(c.get('accuracy'), 4)} | {_fmt(c.get('macro_f1'), 4)} | "
                  f"{_fmt(c.get('p50_ms'), 3)} | {_fmt(c.get('p95_ms'), 3)} | {_fmt(c.get('size_mb'), 3)} | "
                  f"{vocab.clip(c['verdict'], 160).replace('|', '/')} |" for c in outcome.candidates]
    return "\n".join(lines)


def passed(client: MlflowClient, exp: str, run_id: str, gated: str, version: str, reasons: list[str],
           promoted_over: str | None) -> Outcome:
    """The outcome of a pipeline run whose gate passed `gated` (registered as `version`)."""
    return replace(collect(client, exp, run_id), passed=True, gated=gated, version=version, reasons=list(reasons),
                   promoted_over=promoted_over)


def record(client: MlflowClient, run_id: str, outcome: Outcome, params: Params, revision: str) -> str:
    """Name, metrics and description of the pipeline run; returns the description (markdown)."""
    tags = client.get_run(run_id).data.tags
    dataset = dataset_name(params)
    gated = next((c for c in outcome.candidates if c["name"] == outcome.gated), None)
    figures = {f"test_{k}": gated[k] for k in FIGURES if gated and k in gated}
    if outcome.passed is not None:
        figures[vocab.GATE_PASSED] = 1.0 if outcome.passed else 0.0
    client.log_batch(run_id, metrics=stamped(figures | {"candidates": len(outcome.candidates)}))  # when it decided
    md = markdown(outcome, dataset, revision, tags.get(vocab.FLOW_RUN_URL), params.mlflow.registered_model)
    client.set_tag(run_id, vocab.NOTE, vocab.clip(md))
    client.update_run(run_id, name=run_name(dataset, revision, outcome))
    return md


def record_skip(client: MlflowClient, run_id: str, params: Params, revision: str, champion: str, message: str) -> str:
    """Name, tag and description of a pipeline run that trained nothing (its run key was champion `champion`'s);
    returns the description (markdown)."""
    dataset = dataset_name(params)
    url = client.get_run(run_id).data.tags.get(vocab.FLOW_RUN_URL)
    md = "\n".join([f"**SKIPPED: nothing new since champion v{champion}**; nothing trained, registered or promoted.",
                    "", f"Data: `{dataset}` at DVC revision `{revision[:12]}`."
                    + (f" Prefect: [flow run]({url})." if url else ""), "", f"- {message}"])
    client.set_tag(run_id, vocab.SKIPPED, vocab.clip(message))
    client.set_tag(run_id, vocab.NOTE, vocab.clip(md))
    client.update_run(run_id, name=skipped_name(dataset, revision, champion))
    return md
