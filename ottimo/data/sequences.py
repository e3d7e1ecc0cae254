"""The `sequences` builtin: a seeded sequence-classification task that runs offline (data.builtin: sequences).

Each class owns a few indicative token ids ("markers"); a row is background tokens drawn from a Zipf-like
distribution, of a random true length, padded with the padding id, with markers of its class planted at random
positions (and fewer of another class as distractors). A model that embeds tokens and pools over them (the
transformer) learns it; a model reading the raw ids as numbers (an mlp) does not. Length, vocabulary and rows are
settings (data.input.shape, data.input.vocab_size, data.sequences), so a larger profile is only configuration.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ottimo.config import DataCfg, SequencesCfg

LENGTH, VOCAB = 32, 200  # data.input.shape / vocab_size when null


def dimensions(cfg: DataCfg) -> tuple[int, int]:
    """(length, vocab_size) of the builtin: data.input's, or the defaults where null."""
    return (cfg.input.shape[0] if cfg.input.shape else LENGTH), (cfg.input.vocab_size or VOCAB)


def generate(s: SequencesCfg, length: int, vocab: int, pad_id: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (rows, length) int64 and class labels (rows,) int64, reproducible by `seed`."""
    if pad_id >= vocab:
        raise ValueError(f"data.input.pad_id {pad_id} is outside the vocabulary (ids 0 .. {vocab - 1}); lower it or "
                         "raise data.input.vocab_size")
    usable = np.delete(np.arange(vocab), pad_id)
    if len(usable) < s.classes * s.markers + 8:
        raise ValueError(f"vocab_size {vocab} is too small for {s.classes} classes x {s.markers} markers plus "
                         "background tokens; raise data.input.vocab_size")
    if length < s.min_length:
        raise ValueError(f"sequence length {length} is below data.sequences.min_length {s.min_length}")
    rng = np.random.default_rng(seed)
    picked = rng.permutation(usable)
    markers = picked[: s.classes * s.markers].reshape(s.classes, s.markers)
    background = picked[s.classes * s.markers:]
    weights = 1.0 / np.arange(1, len(background) + 1)  # Zipf-like: a few common tokens, a long tail
    y = rng.permutation(np.arange(s.rows) % s.classes)
    lengths = rng.integers(s.min_length, length + 1, s.rows)
    X = rng.choice(background, size=(s.rows, length), p=weights / weights.sum())
    inside = np.arange(length)[None, :] < lengths[:, None]
    slots = np.argsort(np.where(inside, rng.random((s.rows, length)), np.inf), axis=1)  # random true positions
    rows = np.arange(s.rows)[:, None]
    X[rows, slots[:, : s.planted]] = markers[y[:, None], rng.integers(s.markers, size=(s.rows, s.planted))]
    if s.distractors:
        other = (y + rng.integers(1, s.classes, s.rows)) % s.classes
        picks = rng.integers(s.markers, size=(s.rows, s.distractors))
        X[rows, slots[:, s.planted: s.planted + s.distractors]] = markers[other[:, None], picks]
    X[~inside] = pad_id
    return X.astype(np.int64), y.astype(np.int64)


def feature_names(length: int) -> list[str]:
    return [f"token_{i}" for i in range(length)]


def frame(cfg: DataCfg) -> pd.DataFrame:
    """The builtin as a raw table: one column per position (token_0 ...) and the target."""
    length, vocab = dimensions(cfg)
    X, y = generate(cfg.sequences, length, vocab, cfg.input.pad_id, cfg.seed)
    df = pd.DataFrame(X, columns=feature_names(length))
    df[cfg.target] = y
    return df
