"""Model cards in the MLflow registry: measure a registered version from its ONNX file and data revision, gather
its lineage, store the card as the version's description plus `card/` artifacts of its run, read it back.

No Prefect: the pipeline's card task and `ottimo card` both call it, so a card is recomputed the same way for any
old version (with the card settings it was first computed with, when it has a stored card).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ottimo import vocab
from ottimo.card.render import description, render
from ottimo.card.sections import ModelCard, measure_card
from ottimo.config import CardCfg, Params
from ottimo.data import versioning
from ottimo.data.tables import load_splits
from ottimo.registry import security, versions
from ottimo.registry.gate import Verdict

CARD_DIR = "card"
TEACHER_TAGS = ("teacher", "teacher_version", "teacher_run_id")  # version tags, then run tags, first found wins


def code_commit() -> str:
    """`git rev-parse HEAD` of the code's checkout (+"-dirty" with uncommitted changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def record_commit(client: MlflowClient, run_id: str) -> str:
    """Tag the training run with the code commit once (the pipeline calls this; recomputations read the tag)."""
    tags = client.get_run(run_id).data.tags
    if vocab.COMMIT not in tags:
        commit = code_commit()
        client.set_tag(run_id, vocab.COMMIT, commit)
        return commit
    return tags[vocab.COMMIT]


def prepared_for(root: Path, revision: str) -> Path:
    """The prepared splits of `revision`: data/prepared when dvc.lock is at it, else pulled by DVC into
    mlruns/work/data-<revision> (kept for the next recompute)."""
    try:
        current = versioning.revision(root)
    except (OSError, KeyError):
        current = None
    prepared = root / versioning.PREPARED
    if current == revision and (prepared / "schema.json").is_file():
        return prepared
    dst = root / "mlruns" / "work" / f"data-{revision[:12]}"
    if (dst / "prepared" / "schema.json").is_file():
        return dst / "prepared"
    return versioning.checkout_dir(root, revision, dst)


def lineage(client: MlflowClient, name: str, mv: ModelVersion) -> dict:
    """What the version is made of and how it was judged, from its tags and its training and pipeline runs."""
    run = client.get_run(mv.run_id)
    parent_id = run.data.tags.get(vocab.PARENT)
    parent = client.get_run(parent_id).data.params if parent_id else {}
    reasons = vocab.tag(mv.tags, vocab.GATE_REASONS, "")
    teacher = next((src[t] for src in (mv.tags, run.data.tags) for t in TEACHER_TAGS if src.get(t)), None)
    return {
        "model": name, "version": str(mv.version), "family": mv.tags.get("family"),
        "run_id": mv.run_id, "parent_run_id": parent_id,
        "data_revision": vocab.tag(mv.tags, vocab.DATA_REVISION),
        "code_commit": run.data.tags.get(vocab.COMMIT, "unknown (not recorded for this version)"),
        "params": dict(sorted(run.data.params.items())),
        "teacher": teacher,
        "sha256": mv.tags.get("sha256"),
        "gate": {"verdict": vocab.tag(mv.tags, vocab.GATE_VERDICT, vocab.PENDING),
                 "reasons": reasons.split("; ") if reasons else [],
                 "thresholds": {k.removeprefix("gate."): v for k, v in sorted(parent.items())
                                if k.startswith("gate.")}},
    }


def build(root: Path, params: Params, client: MlflowClient, name: str, ref: str, work: Path,
          cfg: CardCfg | None = None, verdict_for: Callable[[dict[str, float]], Verdict] | None = None,
          ) -> tuple[ModelCard, ModelVersion]:
    """Measure version `ref` from its verified ONNX file on its own data revision; add its lineage.

    `verdict_for` (the pipeline, before the gate has tagged the version) gives the verdict the gate policy
    returns for these figures; otherwise the verdict is the one tagged on the version.
    """
    mv = versions.version(client, name, ref)
    lin = lineage(client, name, mv)
    cfg = cfg or params.card
    if not vocab.tag(mv.tags, vocab.DATA_REVISION):
        raise MlflowException(f"{name} v{mv.version} has no data_revision tag: its test data is unknown")
    path, _ = security.fetch_verified(client, name, str(mv.version), work / "model")
    splits = load_splits(prepared_for(root, vocab.tag(mv.tags, vocab.DATA_REVISION)))
    max_p95 = float(lin["gate"]["thresholds"].get("max_p95_latency_ms", params.gate.max_p95_latency_ms))
    out = work / CARD_DIR
    shutil.rmtree(out, ignore_errors=True)
    card = measure_card(path, splits, cfg, params.evaluate, max_p95, out)
    if verdict_for is not None:
        v = verdict_for(card.figures())
        lin["gate"] |= {"verdict": "passed" if v.passed else "failed", "reasons": list(v.reasons)}
    lin["card_config"] = cfg.model_dump()
    return replace(card, lineage=lin), mv


def store(client: MlflowClient, name: str, mv: ModelVersion, card: ModelCard, out: Path) -> str:
    """card.json, card.md and the plots (already in `out`) to the run's `card/` artifacts; the compact markdown
    as the version's description, and a `card` tag pointing at card.json. Returns the description."""
    (out / "card.json").write_text(json.dumps(card.to_dict(), indent=1))
    (out / "card.md").write_text(render(card, full=True))
    client.log_artifacts(mv.run_id, str(out), CARD_DIR)
    md = description(card)
    client.update_model_version(name, mv.version, description=md)
    client.set_model_version_tag(name, mv.version, "card", f"runs:/{mv.run_id}/{CARD_DIR}/card.json")
    return md


def load_stored(client: MlflowClient, mv: ModelVersion) -> ModelCard | None:
    """The card stored with the version's run, or None when it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = download_artifacts(run_id=mv.run_id, artifact_path=f"{CARD_DIR}/card.json", dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return ModelCard.from_dict(json.loads(Path(path).read_text()))


def recompute(root: Path, params: Params, client: MlflowClient, name: str, ref: str, work: Path,
              ) -> tuple[ModelCard, ModelCard | None, ModelVersion]:
    """Measure a version again (with its stored card's settings when it has one); return it and the stored card."""
    stored = load_stored(client, versions.version(client, name, ref))
    cfg = CardCfg.model_validate(stored.lineage["card_config"]) if stored and "card_config" in stored.lineage \
        else None
    card, mv = build(root, params, client, name, ref, work, cfg)
    return card, stored, mv
