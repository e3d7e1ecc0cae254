"""The input kind of the data (data.input): the InputSpec a prepared data revision records in its schema.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ottimo.config import InputCfg
from ottimo.data.intake import DataValidationError
from ottimo.spec import DTYPES, InputSpec


def derive_spec(cfg: InputCfg, features: list[str], X: pd.DataFrame, source: Path | str) -> InputSpec:
    """The spec of rows with these feature columns: tabular (n_features,), image (C, H, W) whose product is the
    number of columns, or a sequence of integer token ids (vocab_size from the data when not set)."""
    n = len(features)
    shape = tuple(cfg.shape) if cfg.shape else (n,)
    if int(np.prod(shape)) != n:
        raise DataValidationError(
            f"{source}: data.input.shape {list(shape)} holds {int(np.prod(shape))} values per row, the data has "
            f"{n} feature columns; set data.input.shape to match (row-major, e.g. [1, 8, 8] for 64 columns)")
    if cfg.kind != "sequence":
        return InputSpec(cfg.kind, shape, DTYPES[cfg.kind])
    values = X.to_numpy()
    bad = (values != np.floor(values)) | (values < 0)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise DataValidationError(
            f"{source}: a sequence holds token ids, integers >= 0; column {features[col]!r} row {row} holds "
            f"{values[row, col]!r}. Encode the tokens as ids (data.input.pad_id pads short sequences)")
    top = int(values.max()) if values.size else 0
    vocab = cfg.vocab_size or max(top, cfg.pad_id) + 1
    if top >= vocab:
        raise DataValidationError(f"{source}: token id {top} is outside data.input.vocab_size {vocab}; raise "
                                  "vocab_size or set it to null (max id + 1)")
    return InputSpec("sequence", shape, DTYPES["sequence"], vocab, cfg.pad_id)
