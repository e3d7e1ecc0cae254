"""What drift checks compare for images and token sequences: a few meaningful summary features per row, not
thousands of raw pixels or token ids (a per-pixel test drowns in columns; a test on token ids compares arbitrary
numbers). Tabular rows are compared column by column, as they are.

- image (C, H, W): per channel the mean, standard deviation, minimum and maximum, and the mean of each quadrant
  (a coarse spatial summary: a shift, a rotation or a flip moves mass between quadrants).
- sequence (L,): the true length (non-padding tokens), the share of each of the reference's most common tokens,
  the share of rare tokens (the reference's least frequent ones, together RARE_MASS of its tokens) and of tokens
  the reference never has.

Pure: numpy and pandas. The sequence summary needs the reference (which tokens are common there); window and
reference are summarised against the same reference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ottimo.spec import InputSpec

TOP_TOKENS = 10  # the reference's most common tokens whose share per row is compared
RARE_MASS = 0.05  # rare: the least frequent reference tokens that together make up this share of its tokens
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


def summary_frame(frame: pd.DataFrame, features: list[str], spec: InputSpec | None,
                  reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """The columns a drift check compares for `frame`'s rows (same index): the feature columns themselves for
    tabular rows (or no spec), image or sequence summaries otherwise (sequences against `reference`, itself when
    None)."""
    if spec is None or spec.kind == "tabular":
        return frame[features]
    X = frame[features].to_numpy(dtype="float64")
    if spec.kind == "image":
        out = image_summary(X.reshape(len(X), *spec.shape))
    else:
        ref = X if reference is None else reference[features].to_numpy(dtype="float64")
        out = sequence_summary(X.astype("int64"), ref.astype("int64"), int(spec.pad_id or 0), spec.vocab_size)
    return pd.DataFrame(out, index=frame.index)


def image_summary(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per channel of (N, C, H, W) images: mean, std, min, max, and the mean of each quadrant."""
    out: dict[str, np.ndarray] = {}
    for c in range(images.shape[1]):
        ch = images[:, c]
        flat = ch.reshape(len(ch), -1)
        out |= {f"ch{c}_mean": flat.mean(1), f"ch{c}_std": flat.std(1), f"ch{c}_min": flat.min(1),
                f"ch{c}_max": flat.max(1)}
        if min(ch.shape[1:]) >= 2:
            halves = [np.array_split(part, 2, axis=2) for part in np.array_split(ch, 2, axis=1)]
            for name, part in zip(QUADRANTS, [q for row in halves for q in row], strict=True):
                out[f"ch{c}_{name}"] = part.reshape(len(part), -1).mean(1)
    return out


def token_classes(reference: np.ndarray, pad_id: int, vocab: int, top: int = TOP_TOKENS,
                  rare_mass: float = RARE_MASS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the reference's token counts (padding left out): its `top` most common ids, a per-id flag of rare ids
    (the least frequent ones, together at most `rare_mass` of the tokens) and of ids it never has."""
    counts = np.bincount(reference[reference != pad_id].ravel(), minlength=vocab).astype("float64")
    counts[pad_id] = 0
    seen = counts > 0
    order = np.lexsort((np.arange(vocab), -counts))  # most common first, ties by id
    common = order[: min(top, int(seen.sum()))]
    ascending = np.lexsort((np.arange(vocab), counts))
    ascending = ascending[seen[ascending]]
    mass = np.cumsum(counts[ascending]) / max(counts.sum(), 1.0)
    rare = np.zeros(vocab, dtype=bool)
    rare[ascending[mass <= rare_mass]] = True
    unseen = ~seen
    unseen[pad_id] = False
    return common, rare, unseen


def sequence_summary(tokens: np.ndarray, reference: np.ndarray, pad_id: int,
                     vocab: int | None) -> dict[str, np.ndarray]:
    """Per row of (N, L) token ids: its length, the share of each common reference token, of rare and of unseen
    tokens (shares of the row's non-padding tokens)."""
    vocab = max(int(vocab or 0), int(tokens.max(initial=0)) + 1, int(reference.max(initial=0)) + 1, pad_id + 1)
    common, rare, unseen = token_classes(reference, pad_id, vocab)
    real = tokens != pad_id
    length = real.sum(1)
    denom = np.maximum(length, 1)
    out = {"length": length.astype("float64")}
    out |= {f"share_token_{t}": ((tokens == t) & real).sum(1) / denom for t in common}
    out["rare_share"] = (rare[tokens] & real).sum(1) / denom
    out["unseen_share"] = (unseen[tokens] & real).sum(1) / denom
    return out
