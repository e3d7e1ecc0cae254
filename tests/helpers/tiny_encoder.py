"""A small `transformer`-family model on token sequences, exported once per test module: what the fusion,
quantization and accuracy-aware tests run on (d_model 64, 2 layers, sequence 32, vocabulary 500 unless told)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ottimo.models.builtin.transformer import build
from ottimo.onnx.export import export_onnx
from ottimo.spec import InputSpec


def encoder(d_model: int = 64, layers: int = 2, heads: int = 4, ff_dim: int = 128, seq: int = 32, vocab: int = 500,
            classes: int = 4, seed: int = 0, outlier: float | None = None) -> tuple[torch.nn.Module, InputSpec]:
    """Random weights, every 1-D parameter (biases, LayerNorm) perturbed so no two tensors are equal (the exporter
    shares equal constants, which trained models never have). `outlier`: one weight of the last layer's second
    feed-forward matrix set to it, so per-tensor INT8 rounds the rest of that matrix to (almost) zero: a layer that
    quantization breaks, deterministically. The head's bias is centred so predictions spread over the classes."""
    torch.manual_seed(seed)
    spec = InputSpec("sequence", (seq,), "int64", vocab_size=vocab, pad_id=0)
    model = build(spec, classes, d_model=d_model, heads=heads, layers=layers, ff_dim=ff_dim, dropout=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        if outlier is not None:
            model.body.encoder.layers[-1].linear2.weight[0, 0] = outlier
        # centre the head on typical rows, so predictions spread over the classes (not one class everywhere)
        model.body.head.bias -= model(torch.from_numpy(tokens(256, seq, vocab, seed=99))).mean(dim=0)
    return model, spec


def export(path: Path, **kw) -> tuple[Path, InputSpec]:
    model, spec = encoder(**kw)
    return export_onnx(model, spec, path), spec


def tokens(n: int, seq: int = 32, vocab: int = 500, seed: int = 1) -> np.ndarray:
    """n flat rows of token ids (1 .. vocab-1, a padded tail on every other row), as the data tables hold them."""
    rng = np.random.default_rng(seed)
    X = rng.integers(1, vocab, size=(n, seq))
    X[1::2, seq * 3 // 4:] = 0
    return X
