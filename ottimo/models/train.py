"""Seeded training with early stopping on validation loss; the best weights are kept."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ottimo.config import TrainCfg
from ottimo.data.tables import Splits
from ottimo.models.family import Recipe, build

OPTIMIZERS = {
    "sgd": lambda p, lr, wd: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=wd),
    "adam": lambda p, lr, wd: torch.optim.Adam(p, lr=lr, weight_decay=wd),
    "adamw": lambda p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd),
    "rmsprop": lambda p, lr, wd: torch.optim.RMSprop(p, lr=lr, weight_decay=wd),
}


@dataclass
class TrainResult:
    model: nn.Module
    best_epoch: int
    epochs_run: int
    best_val_loss: float
    best_val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def _evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(X)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(dim=1) == y).float().mean().item()


def fit(
    recipe: Recipe,
    splits: Splits,
    cfg: TrainCfg,
    seed: int,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train one candidate (its recipe: family, hparams, optimizer settings) on the train split; stop when val
    loss has not improved for `cfg.patience` epochs, at most `cfg.max_epochs`."""
    seed_everything(seed)
    family = recipe.family
    X, y = torch.from_numpy(splits.rows(splits.X_train)), torch.from_numpy(splits.y_train)
    Xv, yv = torch.from_numpy(splits.rows(splits.X_val)), torch.from_numpy(splits.y_val)
    model = build(recipe, splits.input, len(splits.labels))
    model[0].fit(X)
    optim = OPTIMIZERS[recipe.optimizer](model.parameters(), recipe.lr, recipe.weight_decay)
    gen = torch.Generator().manual_seed(seed)

    best_loss, best_acc, best_epoch, best_state = float("inf"), 0.0, 0, None
    history: list[dict[str, float]] = []
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(X), generator=gen).split(recipe.batch_size):
            optim.zero_grad()
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{family}: loss became {loss.item()} at epoch {epoch}; lower the lr or check the inputs"
                )
            loss.backward()
            optim.step()
            total += loss.item() * len(idx)
        val_loss, val_acc = _evaluate(model, Xv, yv)
        row = {"epoch": epoch, "train_loss": total / len(X), "val_loss": val_loss, "val_accuracy": val_acc}
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if val_loss < best_loss:
            best_loss, best_acc, best_epoch = val_loss, val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, best_epoch, len(history), best_loss, best_acc, history)
