"""Model architectures: an MLP and a small transformer encoder over feature patches."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ottimo.config import MlpCfg, TrainCfg, TransformerCfg


class Standardize(nn.Module):
    """(x - mean) / std with the training split's statistics, so the exported model takes raw features."""

    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def fit(self, X: torch.Tensor) -> Standardize:
        self.mean.copy_(X.mean(dim=0))
        std = X.std(dim=0)
        self.std.copy_(torch.where(std < 1e-3, torch.ones_like(std), std))  # constant columns pass through
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    def __init__(self, n_features: int, n_classes: int, cfg: MlpCfg):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchTransformer(nn.Module):
    """Splits the feature vector into tokens of `patch_size` features (zero-padded), embeds each,
    adds a learned position, runs a TransformerEncoder and classifies the mean token."""

    def __init__(self, n_features: int, n_classes: int, cfg: TransformerCfg):
        super().__init__()
        self.patch = cfg.patch_size
        self.n_tokens = math.ceil(n_features / cfg.patch_size)
        self.pad = self.n_tokens * cfg.patch_size - n_features
        self.embed = nn.Linear(cfg.patch_size, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(1, self.n_tokens, cfg.d_model))
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.heads, cfg.ff_dim, cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, n_classes)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = nn.functional.pad(x, (0, self.pad))
        tokens = self.embed(x.reshape(x.shape[0], self.n_tokens, self.patch)) + self.pos
        return self.head(self.norm(self.encoder(tokens).mean(dim=1)))


def build_model(family: str, n_features: int, n_classes: int, cfg: TrainCfg) -> nn.Sequential:
    """Standardize followed by the family's network; fit the first layer on the train split."""
    if family == "mlp":
        net: nn.Module = MLP(n_features, n_classes, cfg.mlp)
    elif family == "transformer":
        net = PatchTransformer(n_features, n_classes, cfg.transformer)
    else:
        raise ValueError(f"unknown model family {family!r}; use 'mlp' or 'transformer'")
    return nn.Sequential(Standardize(n_features), net)


def rebuild(family: str, n_features: int, n_classes: int, cfg: TrainCfg, checkpoint: Path | str) -> nn.Sequential:
    """A `build_model` network with the state_dict saved at `checkpoint` (torch.load with weights_only=True: no
    pickle), in eval mode; `cfg` is the TrainCfg that built the saved model (patched with its overrides)."""
    model = build_model(family, n_features, n_classes, cfg)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
