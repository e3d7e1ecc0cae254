"""The `transformer` family: a TransformerEncoder over tokens. Token-id sequences are embedded (data.input.kind:
sequence); numeric rows (tabular or image) are cut into patches of `patch_size` values, each embedded linearly."""

from __future__ import annotations

import math

import torch
from torch import nn

from ottimo.spec import InputSpec


class Encoder(nn.Module):
    """Tokens (batch, n, d_model) + learned positions -> pre-norm TransformerEncoder -> mean over tokens -> head."""

    def __init__(self, n_tokens: int, n_classes: int, d_model: int, heads: int, layers: int, ff_dim: int,
                 dropout: float):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, ff_dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)
        nn.init.normal_(self.pos, std=0.02)

    def pooled(self, tokens: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(tokens + self.pos)
        if weights is None:
            return self.head(self.norm(h.mean(dim=1)))
        return self.head(self.norm((h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)))


class PatchTransformer(nn.Module):
    """Numeric rows flattened and split into tokens of `patch_size` values (zero-padded at the end)."""

    def __init__(self, spec: InputSpec, n_classes: int, patch_size: int, **kw):
        super().__init__()
        self.patch = patch_size
        self.n_tokens = math.ceil(spec.size / patch_size)
        self.pad = self.n_tokens * patch_size - spec.size
        self.embed = nn.Linear(patch_size, kw["d_model"])
        self.body = Encoder(self.n_tokens, n_classes, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.pad:
            x = nn.functional.pad(x, (0, self.pad))
        return self.body.pooled(self.embed(x.reshape(x.shape[0], self.n_tokens, self.patch)))


class SequenceTransformer(nn.Module):
    """Token ids embedded (the padding id embeds to zeros); the mean is taken over the non-padding tokens."""

    def __init__(self, spec: InputSpec, n_classes: int, **kw):
        super().__init__()
        if not spec.vocab_size:
            raise ValueError("a token sequence needs its vocabulary size (data.input.vocab_size)")
        self.pad_id = int(spec.pad_id or 0)
        self.embed = nn.Embedding(spec.vocab_size, kw["d_model"], padding_idx=self.pad_id)
        self.body = Encoder(spec.shape[0], n_classes, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = (x != self.pad_id).unsqueeze(-1).to(self.body.pos.dtype)
        return self.body.pooled(self.embed(x), weights)


def build(spec: InputSpec, n_classes: int, d_model: int = 32, heads: int = 4, layers: int = 2, ff_dim: int = 64,
          dropout: float = 0.1, patch_size: int = 8, ff_mult: int | None = None) -> nn.Module:
    """`ff_mult` (the tuning space's) sets ff_dim = d_model * ff_mult."""
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
    kw = {"d_model": int(d_model), "heads": int(heads), "layers": int(layers), "dropout": dropout,
          "ff_dim": int(d_model * ff_mult if ff_mult else ff_dim)}
    if spec.kind == "sequence":
        return SequenceTransformer(spec, n_classes, **kw)
    return PatchTransformer(spec, n_classes, int(patch_size), **kw)
