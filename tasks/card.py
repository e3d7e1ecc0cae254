"""Model-card task: every registered version gets its card before the gate (which may bound card figures)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from ottimo.card import store as cardstore
from ottimo.config import Params
from ottimo.registry import gate as gate_policy
from ottimo.registry.tracking import connect, work_dir
from tasks.evaluate import Evaluated


@dataclass(frozen=True)
class CardRecord:
    version: str
    figures: dict[str, float]  # ottimo.card.sections.FIGURES, what `gate.card` may bound
    card_uri: str  # runs:/<run id>/card/card.json


@task(task_run_name="model_card[{cand.family} v{version}]")
def model_card(root: Path, params: Params, cand: Evaluated, version: str,
               champion_accuracy: float | None, same_data: bool = True) -> CardRecord:
    """Measure the version's card from its registered ONNX file and data revision, with the verdict the gate
    policy gives it (`same_data`: on the champion's data revision, see gate.check); store it as the version's
    description and `card/` artifacts; publish it to Prefect."""
    log = get_run_logger()
    client, _ = connect(root, params.mlflow)
    name = params.mlflow.registered_model
    cardstore.record_commit(client, cand.run_id)
    card, mv = cardstore.build(
        root, params, client, name, version, work_dir(root, cand.run_id),
        verdict_for=lambda figures: gate_policy.check(cand.metrics, params.gate, champion_accuracy, figures,
                                                     same_data=same_data))
    markdown = cardstore.store(client, name, mv, card, work_dir(root, cand.run_id) / cardstore.CARD_DIR)
    create_markdown_artifact(markdown=markdown, key=re.sub(r"[^a-z0-9-]+", "-", f"card-{name}-v{version}".lower()),
                             description=f"Model card of {name} v{version} ({cand.family})")
    f = card.figures()
    kind = next(iter(card.robustness["curves"]), "noise")  # the input kind's first perturbation
    log.info("card %s v%s: acc %.4f, %s robustness %.3f, recall spread %.3f, slice gap %.3f, "
             "%.3g CPU-s per 1M rows, +%.1f MB session memory", cand.family, version, f["accuracy.accuracy"],
             kind, f[f"robustness.{kind}"], f["fairness.recall_spread"], f["fairness.slice_gap"],
             f["scalability.cpu_s_per_million"], f["deployment.peak_memory_mb"])
    return CardRecord(version, f, f"runs:/{cand.run_id}/{cardstore.CARD_DIR}/card.json")
