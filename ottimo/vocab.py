"""Ottimo's vocabulary in MLflow, in one place: alias names, run kinds, the tags on runs and on registered
versions, and the length limits of tag and param values.

One spelling per fact, the same on runs and on registered versions: `data.revision`, `gate.verdict`,
`gate.reasons`. Versions registered before this vocabulary carry `data_revision`, `gate_verdict` and
`gate_reasons`; `tag()` reads those too (LEGACY), so stored registries keep working. Nothing writes them.
"""

from __future__ import annotations

from collections.abc import Mapping

# Aliases of the registered model: served, what rollback restores, the latest gated candidate.
CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous-champion", "challenger"
ONNX_FILE = "model.onnx"  # the served file inside a logged model

# Run kinds: the value of the KIND tag on every run Ottimo creates.
KIND = "ottimo.kind"
PIPELINE, CANDIDATE, COMPRESSED = "pipeline", "candidate", "compressed"
STUDY, TRIAL = "study", "trial"
SCORE, CHECK = "score", "drift-check"  # in the monitoring experiment
CHECKED = "drift.checked"  # on a score run: "false", or the id of the drift-check run that used it
WINDOW, CLOSED = "window", "check.closed"  # on a drift-check run: the hash of its score runs; "false" until closed
QUALITY_SOURCE = "quality.source"  # on a drift-check run: labels | estimate | none; "realized" once labels came
ACCURACY_REALIZED = "accuracy.realized"  # on score and drift-check runs: accuracy on labels that came later
HELD_BACK = "rows.held_back"  # on a drift-check run: rows kept out of the training data appended on retrain
ACTING = "check.acting"  # on a drift-check run: JSON {step: state} of carrying out its decision, written before each
#   step (append: the training data's row count and sha256 before it, the rows it adds; retrain: the flow run it
#   started) and marked done after it; a rerun after a crash resumes from it instead of acting twice
OUTCOME = "outcome."  # prefix on a drift-check run: what its decision did (outcome.data_revision, outcome.champion)
OUTCOME_TRAINING, OUTCOME_CHAMPION = OUTCOME + "training", OUTCOME + "champion"  # a retrain's result, its champion
DRIFT_CHECK = "drift_check.run"  # on a pipeline run: the drift-check run whose retrain started it

# Experiment tags. MLflow 3's UI opens an experiment in its GenAI view (traces, "Agent versions") unless this tag
# says it is classic ML model development (values from its JS bundle: genai_development, custom_model_development).
EXPERIMENT_KIND, CLASSIC_ML = "mlflow.experimentKind", "custom_model_development"
# ... and its sidebar follows a per-browser mode (GenAI by default) that a link sets with this query parameter.
CLASSIC_VIEW = "?workflowType=machine_learning"

# Run tags.
PARENT = "mlflow.parentRunId"  # MLflow's own: nests a run under another in the UI
RUN_NAME = "mlflow.runName"  # MLflow's own: the run's name in the UI
NOTE = "mlflow.note.content"  # MLflow's own: the run's description (markdown) in the UI
FLOW_RUN = "prefect.flow_run_id"  # the Prefect flow run that made the run
FLOW_RUN_URL = "prefect.flow_run_url"
OWNER = "ottimo.owner"  # the process that runs a pipeline, study, score or drift-check run (JSON), for `ottimo doctor`
#   (a RUNNING MLflow run, or a Running Prefect flow run, whose owner is gone is repaired)
FAILURE = "failure"  # why a run failed, in words
FAMILY_RUN = "model.family"
CANDIDATE_NAME = "ottimo.candidate"  # on candidate and compressed runs: the name the gate and the registry know it by
ROOT_FLOW_RUN = "prefect.root_flow_run_id"  # the pipeline's flow run, also on runs made by its subflows
TECHNIQUE = "compress.technique"  # trained | distill | prune-... | int8-...
WORKER = "ottimo.worker"  # on trial and compressed runs: who made it, the Dask worker's address (tcp://host:port)
#   or, on threads, the process (host:pid)
GATE_SELECTED = "gate.selected"  # on the pipeline run: "<candidate> v<version>"
PROMOTED = "champion"  # on the pipeline run: the version it promoted
SKIPPED = "pipeline.skipped"  # on the pipeline run: why it trained nothing (its run key is the champion's)
COMMIT = "ottimo.code_commit"  # the git commit of the code that trained the model

# Tags on both runs and registered versions.
DATA_REVISION = "data.revision"  # DVC md5 of data/prepared
CLASSES = "data.classes"  # on pipeline and candidate runs, logged models: the data revision's classes (JSON, sorted;
#   output i of the model is classes[i]); the ONNX file carries them too (ottimo.onnx.metadata)
GATE_VERDICT = "gate.verdict"  # on a version: pending | passed | failed | abandoned
GATE_REASONS = "gate.reasons"
# The run key (ottimo.registry.runkey), with DATA_REVISION: a pipeline run whose key equals the champion's trains
# nothing. sha256 of the source and library versions that decide the model; of the params that do
CODE_FINGERPRINT, PARAMS_FINGERPRINT = "code.fingerprint", "params.fingerprint"

# Registered-version tags.
RUN_ID = "run_id"
SHA256 = "sha256"  # of the version's ONNX file; checked before it is loaded
FAMILY = "family"  # the candidate's name (a family, or e.g. student-mlp+prune-s50); its model family: FAMILY_RUN
PENDING, PASSED, FAILED, ABANDONED = "pending", "passed", "failed", "abandoned"  # abandoned: its run died first
CHAMPION_SINCE = "champion_since"  # when it last became champion (ISO 8601 UTC; older versions: a Unix time)
ROLLED_BACK, RESTORED, ROLLBACK_BY = "rolled_back", "restored", "rolled_back.by"

# Registered-model tags.
JOURNAL = "ottimo.journal"  # the alias move in progress (JSON), absent when none

LEGACY = {DATA_REVISION: "data_revision", GATE_VERDICT: "gate_verdict", GATE_REASONS: "gate_reasons"}

TAG_LIMIT = 5000  # MLflow keeps at most this many characters of a tag value (and of a version description)
PARAM_LIMIT = 6000  # ... and of a param value


# Metrics on the pipeline run: the gated candidate's figures and the verdict, so runs sort and chart over time.
GATE_PASSED = "gate_passed"  # 1 passed, 0 refused

# Logged-model names may not contain these characters (MLflow's _validate_logged_model_name).
MODEL_NAME_BAD = "/:.%\"'"


def model_name(*parts: str) -> str:
    """A logged model's name from what it is (family, technique), in characters MLflow accepts."""
    name = "-".join(p for p in parts if p) or "model"
    return "".join("-" if c in MODEL_NAME_BAD else c for c in name)


def tag(tags: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    """A tag's value by its current name, or by the name it had before (LEGACY), or `default`."""
    if name in tags:
        return tags[name]
    return tags.get(LEGACY.get(name, name), default)


def clip(value: object, limit: int = TAG_LIMIT) -> str:
    """A value as text that fits a tag."""
    return str(value)[:limit]
