"""The model-family contract: a family is a builder `build(spec, n_classes, **hparams) -> torch.nn.Module` named
in params.yaml (`families.<name>.builder: module:function`), plus its hparams, training settings and tuning space.

The built-in families (ottimo/models/builtin/: mlp, transformer, cnn) are registered through the same contract
(config.BUILTIN_FAMILIES); nothing else in Ottimo knows a family by name. What one candidate is built and trained
with travels between tasks as a `Recipe`; `build` puts an `InputNorm` (the train split's statistics, so the exported
model takes raw rows) in front of the family's network.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ottimo.config import TRAIN_KEYS, FamilyCfg, TrainCfg, deep_merge
from ottimo.spec import InputSpec

Builder = Callable[..., nn.Module]


class FamilyError(ValueError):
    """A family's builder cannot be imported, or cannot build a model for the data's rows."""


@dataclass(frozen=True)
class Recipe:
    """How one candidate is built and trained: its family, the builder and its keyword arguments, the optimizer
    settings. A tuned candidate's recipe has the chosen trial's values."""

    family: str
    builder: str
    hparams: dict = field(default_factory=dict)
    optimizer: str = "adamw"
    lr: float = 0.003
    weight_decay: float = 0.0
    batch_size: int = 64

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls(**json.loads(text))

    def overridden(self, overrides: dict | None) -> Recipe:
        """This recipe with {"hparams": {...}, "train": {...}} (a tuned trial's values, a student's hparams) laid
        over it: hparams key by key, training settings replaced."""
        o = overrides or {}
        return Recipe(**(asdict(self) | (o.get("train") or {}) | {
            "hparams": deep_merge(self.hparams, o.get("hparams") or {})}))


def recipe(families: dict[str, FamilyCfg], train: TrainCfg, name: str, overrides: dict | None = None) -> Recipe:
    """Family `name`'s recipe: its hparams and training settings (train:'s for the ones it leaves null), with
    `overrides` laid over them (Recipe.overridden)."""
    fam = families[name]
    own = {k: v for k, v in fam.train.model_dump().items() if v is not None}
    return Recipe(name, fam.builder, dict(fam.hparams), **({k: getattr(train, k) for k in TRAIN_KEYS} | own)
                  ).overridden(overrides)


def to_overrides(values: dict) -> dict:
    """A trial's flat values -> recipe overrides: training settings (optimizer, lr, ...) apart from hparams."""
    return {"train": {k: v for k, v in values.items() if k in TRAIN_KEYS},
            "hparams": {k: v for k, v in values.items() if k not in TRAIN_KEYS}}


def load_builder(path: str) -> Builder:
    """The function `module.path:name` names; the project folder is importable (config.importable)."""
    module, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as err:
        raise FamilyError(f"builder {path!r}: module {err.name!r} not found; put {module.replace('.', '/')}.py "
                          "in the project folder (beside params.yaml) or install it") from None
    except AttributeError:
        raise FamilyError(f"builder {path!r}: module {module!r} has no {attr!r}") from None
    if not callable(fn):
        raise FamilyError(f"builder {path!r} is not a function")
    return fn


class InputNorm(nn.Module):
    """(x - mean) / std per input value with the train split's statistics; token ids (int rows) pass as they are."""

    def __init__(self, spec: InputSpec):
        super().__init__()
        self.active = spec.dtype != "int64"
        shape = spec.shape if self.active else (1,)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    def fit(self, X: torch.Tensor) -> InputNorm:
        if self.active:
            self.mean.copy_(X.mean(dim=0))
            std = X.std(dim=0)
            self.std.copy_(torch.where(std < 1e-3, torch.ones_like(std), std))  # constant values pass through
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.active else x


def build(r: Recipe, spec: InputSpec, n_classes: int) -> nn.Sequential:
    """InputNorm followed by the family's network for `spec` rows and `n_classes` classes (fit the first layer on
    the train split before training)."""
    fn = load_builder(r.builder)
    try:
        net = fn(spec, n_classes, **r.hparams)
    except (TypeError, ValueError) as err:
        raise FamilyError(f"family {r.family!r} ({r.builder}) cannot be built for {spec.describe()} rows with "
                          f"hparams {r.hparams}: {err}") from None
    if not isinstance(net, nn.Module):
        raise FamilyError(f"family {r.family!r}: {r.builder} returned {type(net).__name__}, not a torch.nn.Module")
    return nn.Sequential(InputNorm(spec), net)


def rebuild(r: Recipe, spec: InputSpec, n_classes: int, checkpoint: Path | str) -> nn.Sequential:
    """A `build` network with the state_dict saved at `checkpoint` (torch.load with weights_only=True: no pickle),
    in eval mode."""
    model = build(r, spec, n_classes)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
