"""The typed schema of `params.yaml`.

`load_params` validates the whole file before any work starts; an invalid file raises
`ConfigError` naming the key, the value given and what is allowed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ottimo.compress.options import QuantizeError, QuantOption

Optimizer = Literal["sgd", "adam", "adamw", "rmsprop"]
Runner = Literal["threads", "dask"]  # how a fan-out stage (tune, compress) runs its tasks: tasks/runner.py


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


def deep_merge(base: dict, extra: dict, skip_none: bool = False) -> dict:
    """`base` with `extra` laid over it: nested dicts merged key by key, any other value replaced; with `skip_none`
    a None in `extra` leaves `base`'s value as it is. Neither dict is changed."""
    return base | {k: deep_merge(base[k] if isinstance(base.get(k), dict) else {}, v, skip_none)
                   if isinstance(v, dict) else v for k, v in extra.items() if not (skip_none and v is None)}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectCfg(Strict):
    name: str = "ottimo"
    seed: int = 42


class SplitsCfg(Strict):
    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    reference: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitsCfg:
        total = self.train + self.val + self.test + self.reference
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test + reference must sum to 1.0, got {total:.4f}")
        return self


def _inside_project(v: str) -> str:
    p = Path(v)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError("must be a relative path inside the project (no '..', not absolute)")
    return v


ProjectPath = Annotated[str, AfterValidator(_inside_project)]  # a file or folder the project owns


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class InputCfg(Strict):
    """What one row is (the model family's `spec`): a flat table, an image, or a sequence of token ids. Images and
    sequences come from feature columns (row-major, the shape's product of them) or from an .npz file (X, y)."""

    kind: Literal["tabular", "image", "sequence"] = "tabular"
    shape: list[int] | None = None  # image [channels, height, width]; sequence [length]; null: the feature count
    pad_id: int = Field(0, ge=0)  # sequence: the padding token id
    vocab_size: int | None = Field(None, ge=2)  # sequence: ids 0 .. vocab_size-1; null: max id in the data + 1

    @model_validator(mode="after")
    def _shape(self) -> InputCfg:
        want = {"image": 3, "sequence": 1}.get(self.kind)
        if self.shape is not None and (min(self.shape, default=0) < 1 or (want and len(self.shape) != want)):
            raise ValueError(f"shape {self.shape} does not fit kind {self.kind!r}: image takes [channels, height, "
                             "width], sequence [length], tabular null or [n_features]; positive integers")
        if self.kind == "image" and self.shape is None:
            raise ValueError("an image input needs its shape, e.g. [1, 8, 8] for digits")
        if self.vocab_size is not None and self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is outside vocab_size {self.vocab_size} (ids 0 .. "
                             f"{self.vocab_size - 1}); the padding id is one of the vocabulary's ids")
        return self


class SequencesCfg(Strict):
    """The `sequences` builtin: a seeded sequence-classification task (data.input gives its length, [32] when null,
    and its vocab_size, 200 when null). Each class has `markers` indicative token ids; a row is background tokens
    (a Zipf-like distribution) of a random true length in [min_length, length], padded with pad_id, with
    `planted` markers of its class and `distractors` of another class put at random positions."""

    rows: int = Field(2000, ge=10)
    classes: int = Field(4, ge=2)
    markers: int = Field(3, ge=1)  # indicative token ids per class
    planted: int = Field(3, ge=1)  # markers of the row's class in each row
    distractors: int = Field(1, ge=0)  # markers of another class in each row (fewer than `planted`)
    min_length: int = Field(8, ge=2)  # shortest true length (before padding)

    @model_validator(mode="after")
    def _fits(self) -> SequencesCfg:
        if self.distractors >= self.planted:
            raise ValueError(f"distractors ({self.distractors}) must be fewer than planted ({self.planted}), or the "
                             "class cannot be told from the tokens")
        if self.planted + self.distractors > self.min_length:
            raise ValueError(f"planted + distractors ({self.planted + self.distractors}) do not fit in min_length "
                             f"{self.min_length}")
        return self


class DataCfg(Strict):
    path: ProjectPath = "data/raw/digits.csv"
    builtin: Literal["digits", "breast_cancer", "wine", "sequences"] | None = "digits"
    target: str = "target"
    features: list[str] | None = None
    labels: list[int] | list[str] | None = None  # the classes: integers or text (ottimo.data.labels); null: the data's
    index_column: Literal["refuse", "drop"] = "refuse"  # a leading column without a name (a written pandas index)
    min_rows: int = Field(100, ge=10)
    input: InputCfg = InputCfg()
    sequences: SequencesCfg = SequencesCfg()  # the `sequences` builtin's size and difficulty
    splits: SplitsCfg = SplitsCfg()
    seed: int = 42

    @field_validator("path")
    @classmethod
    def _table_file(cls, v: str) -> str:
        if Path(v).suffix.lower() not in {".csv", ".parquet", ".npz"}:
            raise ValueError("must end in .csv or .parquet (a table) or .npz (arrays X and y)")
        return v

    @model_validator(mode="after")
    def _sequences_builtin(self) -> DataCfg:
        if self.builtin == "sequences" and self.input.kind != "sequence":
            raise ValueError("builtin 'sequences' is token ids: set data.input to {kind: sequence} (shape [length] "
                             "and vocab_size optional)")
        return self
    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: object) -> object:
        if not isinstance(v, list):
            return v
        if any(isinstance(x, bool) for x in v):
            raise ValueError("class labels are integers or text, not true/false (YAML reads yes, no, true, false, "
                             "on and off as booleans: quote them, e.g. ['yes', 'no'])")
        if len(v) < 2:
            raise ValueError("a classifier needs at least two classes; null takes them from the data")
        if len(set(map(repr, v))) < len(v):
            raise ValueError("each class once: the list has duplicates")
        looks = [x for x in v if isinstance(x, str) and _number(x)]
        if looks:
            raise ValueError(f"{looks[:5]} are numbers written as text; write integer labels without quotes "
                             "(a CSV reads them back as numbers)")
        if any(isinstance(x, str) and not x.strip() for x in v):
            raise ValueError("a text label may not be empty")
        return v


class DvcCfg(Strict):
    remote: str = "local"
    remote_url: str = ".dvc-remote"


class MlflowCfg(Strict):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "ottimo"
    registered_model: str = "ottimo-classifier"


class FloatRange(Strict):
    """A float searched in [low, high], log-uniformly when `log` (learning rates, weight decay)."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class IntRange(Strict):
    """An int searched in [low, high] with `step` (depth, layers)."""

    low: int = Field(ge=1)
    high: int = Field(ge=1)
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        return self


# One searched setting: {low, high, step} of ints, {low, high, log} of floats, or a list of choices; null drops a
# setting of a built-in family's space.
TRAIN_KEYS = ("optimizer", "lr", "weight_decay", "batch_size")  # space keys that are training settings, not hparams


def _range(v: Any) -> Any:
    """A space entry as the range it is: ints without `log` an IntRange, other {low, high} a FloatRange (so an
    error names that range's rule, not every shape the entry could have had)."""
    if v is None or isinstance(v, list | IntRange | FloatRange):
        return v
    if not isinstance(v, dict):
        raise ValueError("must be {low, high, log} (floats), {low, high, step} (ints), a list of choices, or null")
    ints = all(isinstance(v.get(k), int) and not isinstance(v.get(k), bool) for k in ("low", "high"))
    try:
        return (IntRange if ints and "log" not in v else FloatRange).model_validate(v)
    except ValidationError as err:
        raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") + (
            f" ({'.'.join(map(str, e['loc']))})" if e["loc"] else "") for e in err.errors())) from None


SpaceSpec = Annotated[IntRange | FloatRange | list[Any] | None, BeforeValidator(_range)]


class FamilyTrainCfg(Strict):
    """A family's own training settings; each null one is train:'s."""

    optimizer: Optimizer | None = None
    lr: float | None = Field(None, gt=0, le=1)
    weight_decay: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)


def _builder_path(v: str) -> str:
    module, _, attr = v.partition(":")
    if not module or not attr.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError("must be 'module.path:function', e.g. mymodels.net:build (a module importable from the "
                         "project folder)")
    return v


class FamilyCfg(Strict):
    """A model family: `builder(spec, n_classes, **hparams) -> torch.nn.Module` (spec: ottimo.InputSpec), the
    keyword arguments it is built with, its training settings and its tuning space (over hparams and the training
    settings optimizer, lr, weight_decay, batch_size)."""

    builder: Annotated[str, AfterValidator(_builder_path)]
    hparams: dict[str, Any] = Field(default_factory=dict)
    train: FamilyTrainCfg = FamilyTrainCfg()
    space: dict[str, SpaceSpec] = Field(default_factory=dict)
    trial_epochs: int = Field(15, ge=1)  # the epoch budget of one tuning trial (the pruner's max resource)

    def searched(self) -> dict[str, IntRange | FloatRange | list]:
        return {k: v for k, v in self.space.items() if v is not None}


def _space(**kw) -> dict:
    return kw


BUILTIN_FAMILIES: dict[str, dict] = {  # params.yaml's `families:` is laid over these, key by key
    "mlp": {"builder": "ottimo.models.builtin.mlp:build", "hparams": {"hidden": [128, 64], "dropout": 0.1},
            "train": {"lr": 0.003}, "trial_epochs": 20, "space": _space(
                lr={"low": 1e-4, "high": 3e-2, "log": True}, width=[32, 64, 128, 256], depth={"low": 1, "high": 3},
                dropout={"low": 0.0, "high": 0.4}, weight_decay={"low": 1e-6, "high": 1e-2, "log": True},
                batch_size=[32, 64, 128])},
    "transformer": {"builder": "ottimo.models.builtin.transformer:build", "hparams": {
        "patch_size": 8, "d_model": 32, "heads": 4, "layers": 2, "ff_dim": 64, "dropout": 0.1},
        "train": {"lr": 0.002}, "trial_epochs": 15, "space": _space(
            lr={"low": 3e-4, "high": 1e-2, "log": True}, d_model=[16, 32, 64], heads=[2, 4],
            layers={"low": 1, "high": 3}, ff_mult=[2], dropout={"low": 0.0, "high": 0.3},
            weight_decay={"low": 1e-6, "high": 1e-2, "log": True}, batch_size=[32, 64, 128])},
    "cnn": {"builder": "ottimo.models.builtin.cnn:build", "hparams": {
        "channels": [16, 32], "kernel": 3, "hidden": 64, "dropout": 0.1},
        "train": {"lr": 0.003}, "trial_epochs": 15, "space": _space(
            lr={"low": 3e-4, "high": 1e-2, "log": True}, channels=[[8, 16], [16, 32], [32, 64]],
            hidden=[32, 64, 128], dropout={"low": 0.0, "high": 0.3},
            weight_decay={"low": 1e-6, "high": 1e-2, "log": True}, batch_size=[32, 64, 128])},
}


class TrainCfg(Strict):
    """Training of every candidate; a family's own `families.<name>.train` settings win over these."""

    candidates: list[str] = Field(default_factory=lambda: ["mlp", "transformer"], min_length=1)
    max_epochs: int = Field(60, ge=1)
    patience: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Optimizer = "adamw"
    lr: float = Field(0.003, gt=0, le=1)
    weight_decay: float = Field(0.0001, ge=0)
    log_every: int = Field(10, ge=1)


STORAGE_PASSWORD = ("holds a password: tune.storage is logged (MLflow params, Prefect results). Leave it out "
                    "and give the client a libpq password file instead (PGPASSFILE=/path/to/pgpass, mode 0600: "
                    "host:port:db:user:password), e.g. postgresql+psycopg://user@host:5432/optuna")


def storage_password(url: str) -> bool:
    """True when a SQLAlchemy URL carries a password (user:secret@host)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password is not None
    except ArgumentError:
        return False


class TuneCfg(Strict):
    """The tuning stage: one Optuna study per model family in `train.candidates`, before training."""

    enabled: bool = False
    n_trials: int = Field(10, ge=1)  # per family, counted over the whole study: a resumed study runs what is left
    timeout_seconds: float | None = Field(600, gt=0)  # wall budget: no trial starts after it; null for none
    n_jobs: int = Field(2, ge=1)  # trials at once
    threads_per_trial: int = Field(1, ge=1)  # torch threads while trials train: tiny models run fastest on 1
    runner: Runner = "threads"
    dask_address: str | None = None  # a running Dask scheduler; null: OTTIMO_DASK_ADDRESS, else a LocalCluster
    storage: str = "sqlite:///mlruns/optuna.db"  # any SQLAlchemy URL; relative sqlite paths from the project
    study_name: str = "ottimo"  # the study is "<study_name>-<family>-<data revision[:8]>"
    sampler: Literal["tpe", "random", "grid", "nsga2"] = "tpe"
    pruner: Literal["hyperband", "asha", "successive_halving", "median", "none"] = "hyperband"
    min_epochs: int = Field(1, ge=1)  # pruner min resource / median pruner warm-up
    reduction_factor: int = Field(3, ge=2)  # hyperband / successive halving
    startup_trials: int = Field(4, ge=0)  # random trials before TPE models the space; median pruner start-up
    population_size: int = Field(8, ge=2)  # NSGA-II generation size
    grid_points: int = Field(3, ge=1)  # values per float range for the grid sampler
    seed: int | None = None  # null: project.seed
    multi_objective: bool = False  # NSGA-II on (val accuracy, ONNX p95 latency at batch 1); no pruning
    max_accuracy_drop: float = Field(1.0, ge=0, le=100)  # points below the best the chosen fastest trial may be
    # many worker processes or machines on one study (Postgres): a trial whose worker stops beating for
    # grace_seconds is failed and re-run, and that worker's unstarted trials are run by the one that noticed
    heartbeat_seconds: int | None = Field(None, ge=1)  # null: no heartbeat (threads of one process need none)
    grace_seconds: int | None = Field(None, ge=1)  # null: 2 x heartbeat_seconds
    stale_retries: int = Field(3, ge=0)  # re-runs of one trial whose workers keep dying

    @field_validator("storage")
    @classmethod
    def _url(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError("must be a SQLAlchemy URL, e.g. sqlite:///mlruns/optuna.db or postgresql://host/db")
        if storage_password(v):
            raise ValueError(STORAGE_PASSWORD)
        return v

    @model_validator(mode="after")
    def _beat(self) -> TuneCfg:
        if self.grace_seconds is not None and (self.heartbeat_seconds is None
                                               or self.grace_seconds <= self.heartbeat_seconds):
            raise ValueError("tune.grace_seconds needs tune.heartbeat_seconds, and must be longer than it "
                             "(a live worker beats once every heartbeat_seconds)")
        return self


class TargetCfg(Strict):
    """Where a model will run, as measurement settings: onnxruntime intra-op threads and rows per call."""

    threads: int = Field(1, ge=1)
    batch: int = Field(1, ge=1)


class EvaluateCfg(Strict):
    threads: int = Field(1, ge=1)
    warmup: int = Field(50, ge=0)
    runs: int = Field(300, ge=10)  # timed calls per candidate (per target, interleaved across the candidates)
    throughput_batch: int = Field(64, ge=1)
    parity_atol: float = Field(1e-4, gt=0)
    # where the model will run: every compression candidate is timed on each, interleaved with the others
    targets: dict[str, TargetCfg] = Field(default_factory=lambda: {"edge": TargetCfg(threads=1, batch=1)},
                                          min_length=1)
    target: str = "edge"  # the target the selection and the gate's latency rules decide on
    bootstrap: int = Field(2000, ge=100)  # resamples behind each latency percentile's 95% interval

    @model_validator(mode="after")
    def _target_known(self) -> EvaluateCfg:
        if self.target not in self.targets:
            raise ValueError(f"evaluate.target {self.target!r} is not one of evaluate.targets "
                             f"({', '.join(self.targets)}); name one of them or add it")
        return self


# The model card's scalar figures (ottimo.card.sections.FIGURES says which way is better); a gate may bound any of them.
CardFigure = Literal[
    "accuracy.accuracy", "accuracy.macro_f1",
    "robustness.noise", "robustness.scale", "robustness.missing",  # tabular rows
    "robustness.shift", "robustness.rotate", "robustness.dropout", "robustness.substitute",  # images, sequences
    "generalisation.train_test_gap", "generalisation.train_val_gap", "generalisation.drift_accuracy",
    "fairness.recall_spread", "fairness.min_class_recall", "fairness.slice_gap",
    "interpretability.top5_share",
    "scalability.p50_ms", "scalability.p95_ms", "scalability.max_throughput_rps",
    "scalability.cpu_s_per_million", "scalability.cost_per_million",
    "deployment.size_mb", "deployment.peak_memory_mb", "deployment.single_thread_ok", "deployment.opset",
]


class CardBound(Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> CardBound:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class GateCfg(Strict):
    min_accuracy: float = Field(0.9, ge=0, le=1)
    max_p95_latency_ms: float = Field(5.0, gt=0)
    max_size_mb: float = Field(5.0, gt=0)
    max_drop_vs_champion: float = Field(1.0, ge=0, le=100)  # points; for a candidate on a new data revision
    # points a candidate on the champion's own data revision must gain over it (negative: it may trail by that
    # much); 0.5 is more than one test row of digits, so a retrain of the same thing does not displace it
    min_gain: float = Field(0.5, ge=-100, le=100)
    # refuse a candidate whose p95 interval on evaluate.target lies entirely above the champion's (timed
    # interleaved with it at gate time); overlapping intervals are a tie and pass
    no_slower_than_champion: bool = False
    card: dict[CardFigure, CardBound] = Field(default_factory=dict)  # model-card figure -> {min, max}


class SliceCfg(Strict):
    """A column to slice the test split by: one slice per value (bins null), `bins` equal-frequency bins
    with edges taken from the train split (an int), or explicit edges [e0, e1, ...] as [e0, e1) ... bins."""

    column: str
    bins: int | list[float] | None = None

    @field_validator("bins")
    @classmethod
    def _bins(cls, v: int | list[float] | None) -> int | list[float] | None:
        if isinstance(v, int) and v < 2:
            raise ValueError("a number of quantile bins must be at least 2")
        if isinstance(v, list) and (len(v) < 2 or any(b <= a for a, b in zip(v, v[1:], strict=False))):
            raise ValueError("bin edges must be at least two strictly increasing numbers")
        return v


class CardCfg(Strict):
    seed: int = 42
    severities: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.4, 0.8], min_length=2)
    # generalisation: the drift simulator's mild covariate shifts (rotate/blur only when image_shape fits)
    drift_kinds: list[Literal["shift", "scale", "noise", "rotate", "blur"]] = Field(
        default_factory=lambda: ["shift", "scale", "noise", "rotate", "blur"])
    drift_severities: list[float] = Field(default_factory=lambda: [0.1, 0.25], min_length=1)
    slices: list[SliceCfg] = Field(default_factory=list)
    min_slice_rows: int = Field(10, ge=1)
    image_shape: list[int] | None = None  # e.g. [8, 8] for digits: the importance heat-map; null for tabular
    importance_rows: int = Field(300, ge=10)
    importance_repeats: int = Field(3, ge=1)
    top_features: int = Field(10, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 64, 256], min_length=1)
    seconds_per_batch_size: float = Field(0.2, gt=0)
    price_per_cpu_hour: float = Field(0.05, ge=0)
    currency: str = "USD"

    @field_validator("severities")
    @classmethod
    def _severities(cls, v: list[float]) -> list[float]:
        if v[0] != 0 or any(b <= a for a, b in zip(v, v[1:], strict=False)) or v[-1] > 1:
            raise ValueError("must start at 0 and increase strictly up to at most 1")
        return v

    @field_validator("drift_severities")
    @classmethod
    def _mild(cls, v: list[float]) -> list[float]:
        if any(not 0 < x <= 0.5 for x in v):
            raise ValueError("mild shifts: each severity above 0 and at most 0.5 (robustness covers larger ones)")
        return v

    @field_validator("image_shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise ValueError("must be [height, width] of positive integers, or null for tabular data")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if v[0] != 1 or v != sorted(set(v)):
            raise ValueError("must start at 1 (what online serving pays) and increase strictly")
        return v


class ServeCfg(Strict):
    """`ottimo serve` (and `make up`'s endpoint): the champion's ONNX file answering POST /predict on deploy.host.
    Served rows go to `traffic_dir` as monitoring batches the drift check reads (env OTTIMO_SERVE_PORT overrides
    the port; the bearer token, when wanted, comes from the environment variable named by `token_env`)."""

    port: int = Field(8000, ge=1, le=65535)
    alias: Literal["champion", "challenger", "previous-champion"] = "champion"  # the alias it follows
    poll_seconds: float = Field(2.0, gt=0, le=3600)  # how often the registry is asked where the alias points
    threads: int = Field(1, ge=1, le=64)  # onnxruntime intra_op_num_threads of the served session
    max_rows: int = Field(1000, ge=1)  # rows per request; more is a 422
    max_body_bytes: int = Field(1_000_000, ge=1024)  # request body; more is a 413, refused before it is parsed
    token_env: str = "OTTIMO_SERVE_TOKEN"  # when this variable is set, requests need `Authorization: Bearer <it>`
    traffic_dir: ProjectPath = "data/traffic"  # served rows as monitoring batches (one file per segment)
    segment_rows: int = Field(5000, ge=1)  # a traffic segment closes at this many rows ...
    segment_seconds: float = Field(300.0, gt=0)  # ... or this old, or when the answering version changes
    traffic_max_mb: float = Field(512.0, gt=0)  # size bound of traffic_dir: decided segments go first, then
                                                #   new traffic is not logged (counted in /health)


class TeamCfg(Strict):
    """`make up STACK=postgres WORKERS=n`: the team stack on deploy.host. PostgreSQL (a cluster under .run/) for
    Prefect, MLflow and Optuna; a local S3 API (moto) for MLflow's artifacts and the DVC remote; a Dask
    scheduler and workers; a Prefect process work pool with `workers` workers (env WORKERS overrides)."""

    postgres_port: int = Field(5433, ge=1, le=65535)
    s3_port: int = Field(9000, ge=1, le=65535)
    bucket: str = Field("ottimo", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # MLflow under mlflow/, DVC dvc/
    dask_port: int = Field(8786, ge=1, le=65535)
    work_pool: str = "ottimo-process"  # the Prefect work pool the deployments are registered to
    workers: int = Field(2, ge=1, le=64)  # Prefect workers, and Dask workers (one thread each)
    pool_concurrency: int | None = Field(None, ge=1)  # flow runs at once on the pool; null: one per worker
    # where the pool's workers load the flows from (flow.from_source): null, this code folder (workers on this
    # machine, or the same path in their image/volume); or a git URL such as https://git.example.com/team/ottimo.git
    source: str | None = None


class DeployCfg(Strict):
    """`make up`: the servers on 127.0.0.1 and the deployments they serve (OTTIMO_PREFECT_PORT /
    OTTIMO_MLFLOW_PORT override the ports)."""

    host: Literal["127.0.0.1", "localhost"] = "127.0.0.1"  # loopback only; auth is optional (README "Security")
    prefect_port: int = Field(4200, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    training_name: str = "nightly"  # deployment training-pipeline/<training_name>
    training_cron: str | None = "0 2 * * *"  # null: no schedule, runs only when triggered
    timezone: str = "UTC"
    tuning_name: str = "tune-hyperparameters"  # deployment tuning/<tuning_name>, no schedule
    serve: ServeCfg = ServeCfg()  # `ottimo serve`: the online endpoint that follows the champion
    team: TeamCfg = TeamCfg()  # `make up STACK=postgres`


class PruneCfg(Strict):
    """Pruning variants of each base model, each fine-tuned for `finetune_epochs` at `lr`."""

    unstructured: list[float] = Field(default_factory=lambda: [0.5, 0.8])  # global magnitude sparsities
    structured: list[float] = Field(default_factory=lambda: [0.5])  # fraction of channels / neurons removed
    finetune_epochs: int = Field(10, ge=0)
    lr: float = Field(0.001, gt=0, le=1)

    @field_validator("unstructured", "structured")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < x < 1 for x in v):
            raise ValueError("every fraction must be strictly between 0 and 1")
        return v


class QuantizeCfg(Strict):
    """onnxruntime.quantization variants, one candidate per option: int8-dyn (INT8 weights, activations at run
    time), int8-qdq-<minmax|entropy|percentile> (static QDQ S8S8, calibrated on train rows); suffix -pc for
    per-channel weights, -rr for reduce_range (7-bit weights, for CPUs without VNNI)."""

    options: list[str] = Field(default_factory=lambda: ["int8-dyn", "int8-qdq-minmax"])
    calibration_rows: int = Field(256, ge=8)  # seeded sample of the train split for static calibration
    # an INT8 candidate more than compress.select.max_drop_vs_teacher below its FP32 source (validation split)
    # keeps its most sensitive nodes in FP32, up to max_fp32_nodes
    accuracy_aware: bool = False
    max_fp32_nodes: int = Field(8, ge=1)
    after_structured: bool = True  # also quantize every structurally pruned model (prune → quantize chains)
    min_agreement: float = Field(0.97, gt=0, le=1)  # share of test predictions equal to the FP32 model's

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        try:
            names = [QuantOption.parse(o).name for o in v]
        except QuantizeError as err:
            raise ValueError(str(err)) from None
        if len(set(names)) != len(names):
            raise ValueError(f"options lists one twice: {names}")
        return names


class DistillCfg(Strict):
    """A smaller student trained on the teacher's temperature-softened logits plus the hard labels."""

    enabled: bool = True
    student: str = "mlp"  # a family (families:); its hparams with `hparams` laid over them
    hparams: dict[str, Any] = Field(default_factory=dict)  # e.g. {hidden: [64], dropout: 0.0} for an mlp student
    lr: float | None = Field(None, gt=0, le=1)  # null: the student family's training lr
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)  # weight of the soft (KL) term; 1 - alpha on cross-entropy
    epochs: int = Field(40, ge=1)


class SelectCfg(Strict):
    """Which candidate (trained or compressed) goes to the gate."""

    max_drop_vs_teacher: float = Field(1.0, ge=0, le=100)  # accuracy points below the FP32 teacher in onnxruntime
    min_accuracy: float = Field(0.9, ge=0, le=1)  # absolute floor
    objective: Literal["p95_ms", "p50_ms", "size_mb", "throughput_rps", "accuracy"] = "p95_ms"
    # latency objectives: differences within max(latency_tie_ms, latency_tie_relative x the best) are measurement
    # noise, not a ranking; such ties go to higher accuracy, then the smaller file, then the name
    latency_tie_ms: float = Field(0.002, ge=0)
    latency_tie_relative: float = Field(0.05, ge=0, le=1)


class CompressCfg(Strict):
    """The compression stage: variants of the teacher (and of its distilled student), measured side by side."""

    enabled: bool = False
    teacher: str = "transformer"  # the trained family compressed; must be in train.candidates
    bases: list[Literal["teacher", "student"]] = Field(default_factory=lambda: ["teacher", "student"], min_length=1)
    prune: PruneCfg = PruneCfg()
    quantize: QuantizeCfg = QuantizeCfg()
    distill: DistillCfg = DistillCfg()
    select: SelectCfg = SelectCfg()
    # an FP32 candidate of each base with attention, LayerNorm and GELU fused (ottimo.compress.fusion); INT8 then
    # starts from it
    fuse: bool = False
    n_jobs: int = Field(2, ge=1)  # variants built at once: threads, or LocalCluster workers (measured one by one)
    runner: Runner = "threads"  # dask: variants are built on Dask workers (measured in the flow's process)
    dask_address: str | None = None  # a running Dask scheduler; null: OTTIMO_DASK_ADDRESS, else a LocalCluster

    @model_validator(mode="after")
    def _student_needs_distill(self) -> CompressCfg:
        if "student" in self.bases and not self.distill.enabled:
            raise ValueError("bases lists 'student' but distill.enabled is false; enable it or drop 'student'")
        return self


class LimitsCfg(Strict):
    """Guards on input files (training data now, scoring batches later): the size limits are checked before
    a file is read into memory; a feature beyond +-max_abs_value is taken for corruption, not data."""

    max_file_mb: float = Field(1024, gt=0)  # a bigger file is refused without being read
    max_rows: int = Field(5_000_000, ge=1)  # from the Parquet footer, or a streamed line count of a CSV
    max_abs_value: float | None = Field(1e9, gt=0)  # null: no bound on feature values
    quarantine_dir: ProjectPath = "data/quarantine"  # rejected files (or a note when too big) + .reason.txt


class ReliabilityCfg(Strict):
    """Promotion safety and crash recovery: the promotion lock, and the repairs `ottimo doctor` makes."""

    lock_timeout_seconds: float = Field(120, gt=0)  # wait this long for another promotion/rollback, then refuse
    reconcile_on_start: bool = True  # the pipeline first repairs what a crashed run left (= `ottimo doctor --repair`)
    stale_run_hours: float = Field(24, gt=0)  # a RUNNING MLflow run whose process cannot be checked counts as dead

class ScoreCfg(Strict):
    """Batch scoring: batches (CSV, Parquet or .npz) arrive in `incoming`; malformed ones move to limits.quarantine_dir
    (the one quarantine folder: training data, batches and served traffic alike)."""

    incoming: ProjectPath = "data/incoming"
    deployment_name: str = "score-incoming"  # deployment batch-scoring/<deployment_name>, run from the UI


class DriftCfg(Strict):
    """The scheduled drift check (Evidently) and the policy that picks nothing | retrain | rollback."""

    min_rows: int = Field(100, ge=10)  # a smaller window is "insufficient data": no decision, batches wait
    max_rows: int = Field(10_000, ge=100)  # window and reference sampled (seeded) to this many rows each
    drift_share: float = Field(0.5, gt=0, le=1)  # data drift when this share of feature columns drifted
    method: str | None = None  # Evidently stat test for every feature column (ks, wasserstein, psi, ...); null: auto
    threshold: float | None = None  # its per-column threshold; null: the test's default
    prediction_method: str | None = None  # stat test on the champion's predictions; null: auto (chi-square)
    prediction_drift_retrains: bool = False  # prediction drift alone triggers a retrain
    max_quality_drop: float = Field(5.0, ge=0, le=100)  # points of accuracy below the reference before retraining
    rollback_margin: float = Field(5.0, ge=0, le=100)  # points champion may trail previous-champion on a window
    cooldown_hours: float = Field(24.0, ge=0)  # no second retrain within this many hours
    min_labelled_rows: int = Field(50, ge=1)  # fewer labelled rows: the policy acts on the estimated accuracy
    estimate: bool = True  # estimate accuracy without labels (CBPE, calibrated on the reference split)
    estimate_sigmas: float = Field(3.0, gt=0)  # the estimate's band: this many standard deviations
    alert_sigmas: float = Field(4.0, gt=0)  # alarm lines derived from reference chunks: this many spreads away
    chunks: int = Field(200, ge=10)  # bootstrap reference chunks (of the window's size) behind the alarm lines
    multivariate: bool = True  # PCA reconstruction-error check of joint shifts
    multivariate_variance: float = Field(0.65, gt=0, le=1)  # share of the reference's variance the PCA keeps
    multivariate_threshold: float | None = Field(None, gt=1)  # error ratio that alarms; null: from reference chunks
    impact_columns: int = Field(20, ge=0)  # drifted columns whose effect on the predictions is weighed (0: off)
    holdback_margin: float | None = Field(0.5, ge=0)  # rows beyond the reference range by this share of it are
    #                                                   held back from retraining data; null: none held back
    accept_drifted_rows: bool = False  # append held-back rows anyway (or `ottimo drift-check --accept-drifted`)
    seed: int = 42
    experiment: str | None = None  # MLflow monitoring experiment; null: "<mlflow.experiment>-monitoring"
    deployment_name: str = "scheduled"  # deployment drift-check/<deployment_name>
    cron: str | None = "0 * * * *"  # its schedule (deploy.timezone); null: on demand only


class Params(Strict):
    project: ProjectCfg = ProjectCfg()
    data: DataCfg = DataCfg()
    families: dict[str, FamilyCfg] = Field(default_factory=lambda: {
        k: FamilyCfg.model_validate(v) for k, v in BUILTIN_FAMILIES.items()})
    dvc: DvcCfg = DvcCfg()
    mlflow: MlflowCfg = MlflowCfg()
    train: TrainCfg = TrainCfg()
    tune: TuneCfg = TuneCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    gate: GateCfg = GateCfg()
    card: CardCfg = CardCfg()
    deploy: DeployCfg = DeployCfg()
    compress: CompressCfg = CompressCfg()
    limits: LimitsCfg = LimitsCfg()
    reliability: ReliabilityCfg = ReliabilityCfg()
    score: ScoreCfg = ScoreCfg()
    drift: DriftCfg = DriftCfg()

    @model_validator(mode="before")
    @classmethod
    def _builtin_families(cls, raw: Any) -> Any:
        """params.yaml's `families:` laid over the built-in ones: a new name adds a family, a built-in name
        changes only the keys given (hparams and space key by key)."""
        if isinstance(raw, dict) and isinstance(raw.get("families", {}), dict):
            given = raw.get("families") or {}
            merged = {k: deep_merge(BUILTIN_FAMILIES.get(k, {}), v) if isinstance(v, dict) else v
                      for k, v in given.items()}
            raw = raw | {"families": BUILTIN_FAMILIES | merged}
        return raw

    @model_validator(mode="after")
    def _families_known(self) -> Params:
        known = sorted(self.families)
        named = [("train.candidates", f) for f in self.train.candidates] + [
            ("compress.teacher", self.compress.teacher), ("compress.distill.student", self.compress.distill.student)]
        for key, name in named:
            if name not in self.families:
                raise ValueError(f"{key}: {name!r} is not a model family; families are {known} (add yours under "
                                 "families: with its builder)")
        return self

    @model_validator(mode="after")
    def _teacher_is_trained(self) -> Params:
        if self.compress.enabled and self.compress.teacher not in self.train.candidates:
            raise ValueError(f"compress.teacher {self.compress.teacher!r} is not in train.candidates "
                             f"{self.train.candidates}; add it there or pick another teacher")
        return self

    def overridden(self, overrides: dict) -> Params:
        """This config with nested `overrides` (e.g. {"train": {"max_epochs": 3}}, from a flow run's parameters)
        applied and validated again; None values are left out."""
        return (parse_params(deep_merge(self.model_dump(), overrides, skip_none=True), "flow-run parameters")
                if overrides else self)


MOVED = {  # keys of earlier versions, and where their settings live now
    "train.mlp": "families.mlp.hparams (and families.mlp.train)",
    "train.transformer": "families.transformer.hparams (and families.transformer.train)",
    "tune.space": "families.<name>.space (and families.<name>.trial_epochs)",
    "compress.distill.mlp": "compress.distill.hparams", "compress.distill.transformer": "compress.distill.hparams",
    **{f"compress.quantize.{k}": "compress.quantize.options (names such as int8-dyn, int8-dyn-pc, int8-qdq-minmax, "
       "int8-qdq-entropy-rr)" for k in ("methods", "per_channel", "reduce_range")},
}


def _shown(value: Any) -> Any:
    """A value as an error message may show it: a URL's password masked (***)."""
    if isinstance(value, str) and storage_password(value):
        from sqlalchemy.engine import make_url

        return make_url(value).render_as_string(hide_password=True)
    return value


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden" and key in MOVED:
            lines.append(f"  - {key}: this setting moved to {MOVED[key]}; move it there")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (value {e['input']!r}); remove it or check its spelling")
        elif not e["loc"]:  # a check across sections: its message names the keys
            lines.append(f"  - {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - {key}: got {_shown(e['input'])!r}; {e['msg']}")
    lines.append("Fix the file and run again; nothing was run.")
    return "\n".join(lines)


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_params(path: str | Path) -> Params:
    """Read and validate params.yaml; raise ConfigError that names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project folder or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections (project, data, train, ...)")
    importable(path.parent)
    return parse_params(raw, str(path))


def importable(project: Path) -> None:
    """Put the project folder on sys.path, so that a family's builder (families.<name>.builder) imports from it."""
    folder = str(Path(project).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)


def project_params(root: str | Path, params_file: str = "params.yaml") -> Params:
    """load_params for a file named relative to the project (a flow parameter, a CLI option). It must stay inside
    the project, so a run started from the UI cannot make Ottimo read (and echo) a file elsewhere."""
    base = Path(root).resolve()
    path = (base / params_file).resolve()
    if not path.is_relative_to(base):
        raise ConfigError(f"params file {params_file!r} resolves to {path}, outside the project {base}; "
                          "name a file inside the project folder")
    return load_params(path)
