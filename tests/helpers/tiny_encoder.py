"""A small `transformer`-family model on token sequences, exported once per test module: what the fusion,
quantization and accuracy-aware tests run on (d_model 64, 2 layers, sequence 32, vocabulary 500 unless told).

The encoder is trained for a few steps (once per process) on a rule of its tokens, so that its decisions have
margins, as a real model's do. A randomly initialised one decides almost every row by a near tie: on a CPU without
VNNI, where onnxruntime's u8s8 products saturate, INT8's extra noise then flipped about 10% of them."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import torch

from ottimo.models.builtin.transformer import build
from ottimo.onnx.export import export_onnx
from ottimo.spec import InputSpec

STEPS, BATCH, LR = 150, 64, 3e-3


def tokens(n: int, seq: int = 32, vocab: int = 500, seed: int = 1) -> np.ndarray:
    """n flat rows of token ids (1 .. vocab-1, a padded tail on every other row), as the data tables hold them."""
    rng = np.random.default_rng(seed)
    X = rng.integers(1, vocab, size=(n, seq))
    X[1::2, seq * 3 // 4:] = 0
    return X


def labels(X: np.ndarray, vocab: int = 500, classes: int = 4) -> np.ndarray:
    """The rule it learns: which of `classes` equal ranges of token ids holds most of the row's (non-padding)
    tokens."""
    bins = (X - 1) * classes // (vocab - 1)
    return np.stack([((bins == c) & (X != 0)).sum(axis=1) for c in range(classes)], axis=1).argmax(axis=1)


@functools.cache
def _trained(d_model: int, layers: int, heads: int, ff_dim: int, seq: int, vocab: int, classes: int,
             seed: int) -> tuple[torch.nn.Module, InputSpec]:
    torch.manual_seed(seed)
    spec = InputSpec("sequence", (seq,), "int64", vocab_size=vocab, pad_id=0)
    model = build(spec, classes, d_model=d_model, heads=heads, layers=layers, ff_dim=ff_dim, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    X = tokens(4096, seq, vocab, seed=100)
    X, y = torch.from_numpy(X), torch.from_numpy(labels(X, vocab, classes))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    rows = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        i = torch.randint(0, len(X), (BATCH,), generator=rows)
        loss = torch.nn.functional.cross_entropy(model(X[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), spec


def encoder(d_model: int = 64, layers: int = 2, heads: int = 4, ff_dim: int = 128, seq: int = 32, vocab: int = 500,
            classes: int = 4, seed: int = 0, outlier: float | None = None) -> tuple[torch.nn.Module, InputSpec]:
    """A copy of the trained encoder. Every 1-D parameter (biases, LayerNorm) was perturbed before training, so no
    two tensors are equal (the exporter shares equal constants, which trained models never have). `outlier`: one
    weight of the last layer's second feed-forward matrix set to it, so per-tensor INT8 rounds the rest of that
    matrix to (almost) zero: a layer that quantization breaks, deterministically."""
    model, spec = _trained(d_model, layers, heads, ff_dim, seq, vocab, classes, seed)
    model = copy.deepcopy(model)
    if outlier is not None:
        with torch.no_grad():
            model.body.encoder.layers[-1].linear2.weight[0, 0] = outlier
    return model, spec


def export(path: Path, **kw) -> tuple[Path, InputSpec]:
    model, spec = encoder(**kw)
    return export_onnx(model, spec, path), spec
