"""The typed schema of `params.yaml`.

`load_params` validates the whole file before any work starts; an invalid file raises
`ConfigError` naming the key, the value given and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Optimizer = Literal["sgd", "adam", "adamw", "rmsprop"]
Family = Literal["mlp", "transformer"]


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectCfg(Strict):
    name: str = "ottimo"
    seed: int = 42


class Splits(Strict):
    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    reference: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> Splits:
        total = self.train + self.val + self.test + self.reference
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test + reference must sum to 1.0, got {total:.4f}")
        return self


class DataCfg(Strict):
    path: str = "data/raw/digits.csv"
    builtin: Literal["digits", "breast_cancer", "wine"] | None = "digits"
    target: str = "target"
    features: list[str] | None = None
    labels: list[int] | None = None
    min_rows: int = Field(100, ge=10)
    splits: Splits = Splits()
    seed: int = 42

    @field_validator("path")
    @classmethod
    def _inside_project(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError("must be a relative path inside the project (no '..', not absolute)")
        if p.suffix.lower() not in {".csv", ".parquet"}:
            raise ValueError("must end in .csv or .parquet")
        return v


class DvcCfg(Strict):
    remote: str = "local"
    remote_url: str = ".dvc-remote"


class MlflowCfg(Strict):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "ottimo"
    registered_model: str = "ottimo-classifier"


class MlpCfg(Strict):
    hidden: list[int] = Field(default_factory=lambda: [128, 64], min_length=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    optimizer: Optimizer = "adamw"
    lr: float = Field(0.003, gt=0, le=1)
    weight_decay: float = Field(0.0001, ge=0)


class TransformerCfg(Strict):
    patch_size: int = Field(8, ge=1)
    d_model: int = Field(32, ge=4)
    heads: int = Field(4, ge=1)
    layers: int = Field(2, ge=1)
    ff_dim: int = Field(64, ge=4)
    dropout: float = Field(0.1, ge=0, lt=1)
    optimizer: Optimizer = "adamw"
    lr: float = Field(0.002, gt=0, le=1)
    weight_decay: float = Field(0.0001, ge=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerCfg:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        return self


class TrainCfg(Strict):
    candidates: list[Family] = Field(default_factory=lambda: ["mlp", "transformer"], min_length=1)
    max_epochs: int = Field(60, ge=1)
    patience: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)
    log_every: int = Field(10, ge=1)
    mlp: MlpCfg = MlpCfg()
    transformer: TransformerCfg = TransformerCfg()


class EvaluateCfg(Strict):
    threads: int = Field(1, ge=1)
    warmup: int = Field(50, ge=0)
    runs: int = Field(300, ge=10)
    throughput_batch: int = Field(64, ge=1)
    parity_atol: float = Field(1e-4, gt=0)


class GateCfg(Strict):
    min_accuracy: float = Field(0.9, ge=0, le=1)
    max_p95_latency_ms: float = Field(5.0, gt=0)
    max_size_mb: float = Field(5.0, gt=0)
    max_drop_vs_champion: float = Field(1.0, ge=0, le=100)


class Params(Strict):
    project: ProjectCfg = ProjectCfg()
    data: DataCfg = DataCfg()
    dvc: DvcCfg = DvcCfg()
    mlflow: MlflowCfg = MlflowCfg()
    train: TrainCfg = TrainCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    gate: GateCfg = GateCfg()


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (value {e['input']!r}); remove it or check its spelling")
        else:
            lines.append(f"  - {key}: got {e['input']!r}; {e['msg']}")
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
    return parse_params(raw, str(path))
