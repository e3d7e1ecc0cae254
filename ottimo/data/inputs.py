"""The input kind of the data (data.input): the InputSpec a prepared data revision records in its schema.json, the
.npz layout images and sequences may come in, and the checks rows must pass for a model of that kind.

Rows stay flat feature columns everywhere (tables, splits, batches, served rows). An .npz file holds `X` (N, C, H, W)
for images or (N, L) for sequences (any (N, ...) for tabular rows) and, for training data, `y` (N,); it is read into
a frame of flattened, named columns (`pixel_<c>_<h>_<w>`, `token_<i>`, `value_<i>`) and the target.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from ottimo.config import DataCfg, InputCfg
from ottimo.data import sequences
from ottimo.data.intake import DataValidationError, npz_arrays
from ottimo.spec import DTYPES, InputSpec

NPZ_ARRAYS = {"X", "y"}


def input_of(cfg: DataCfg) -> InputCfg:
    """data.input, with the `sequences` builtin's length and vocabulary filled in where they are null."""
    if cfg.builtin != "sequences":
        return cfg.input
    length, vocab = sequences.dimensions(cfg)
    return cfg.input.model_copy(update={"shape": [length], "vocab_size": vocab})


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
    top = int(values.max()) if values.size and np.isfinite(values).all() else 0
    vocab = cfg.vocab_size or max(top, cfg.pad_id) + 1
    check_ids(values, features, vocab, source, "data.input.vocab_size")
    return InputSpec("sequence", shape, DTYPES["sequence"], vocab, cfg.pad_id)


def check_ids(values: np.ndarray, features: list[str], vocab: int, source: Path | str,
              where: str = "the model's vocabulary") -> None:
    """Token ids must be integers in 0 .. vocab - 1; the first one that is not is named by column, row and value."""
    values = np.asarray(values, dtype="float64")
    bad = ~np.isfinite(values) | (values != np.floor(values)) | (values < 0) | (values >= vocab)
    if not bad.any():
        return
    row, col = (int(i[0]) for i in np.nonzero(bad))
    v = values[row, col]
    why = (f"is outside {where} (ids 0 .. {vocab - 1})" if np.isfinite(v) and v == np.floor(v) and v >= 0
           else "is not a token id (an integer >= 0)")
    raise DataValidationError(
        f"{source}: column {features[col]!r} row {row} holds {v:g}, which {why}; {int(bad.sum())} value(s) "
        "like it. A sequence holds integer token ids (data.input.pad_id pads short sequences); encode unseen "
        "tokens with an id of the vocabulary")


def spec_of(schema: dict) -> InputSpec:
    """The InputSpec a prepared schema.json records (a flat table of its features when it predates data.input)."""
    return InputSpec.from_dict(schema["input"]) if "input" in schema else InputSpec.tabular(len(schema["features"]))


def npz_columns(shape: tuple[int, ...], kind: str | None = None) -> list[str]:
    """Flattened (row-major) column names of rows of `shape`: pixel_<c>_<h>_<w> for images (C, H, W), token_<i>
    for sequences, value_<i>[_<j>...] for other rows (the kind: data.input.kind; None: images by their 3 axes)."""
    prefix = "token" if kind == "sequence" else "pixel" if kind == "image" or len(shape) == 3 else "value"
    return [f"{prefix}_" + "_".join(map(str, ix)) for ix in itertools.product(*(range(n) for n in shape))]


def check_npz_shape(path: Path, cfg: InputCfg) -> None:
    """An .npz data file's X must have data.input's row shape (images (N, C, H, W), sequences (N, L)); the error
    names both. Looks at the header only."""
    if path.suffix.lower() != ".npz":
        return
    found = npz_arrays(path).get("X", ((),))[0][1:]
    want = {"image": 3, "sequence": 1}.get(cfg.kind)
    if (cfg.shape and tuple(cfg.shape) != tuple(found)) or (want and len(found) != want):
        expected = list(cfg.shape) if cfg.shape else "(length,)" if cfg.kind == "sequence" else "?"
        raise DataValidationError(
            f"{path}: X holds rows of shape {list(found)}, data.input ({cfg.kind}) expects {expected}; save X as "
            "(N, C, H, W) for images or (N, L) for sequences, or set data.input.shape to the rows' shape")


def read_npz(path: Path, target: str = "target", kind: str | None = None, features: list[str] | None = None,
             spec: InputSpec | None = None) -> pd.DataFrame:
    """An .npz (X, and y when labelled) as a frame of flat feature columns and `target`. With `spec`, X's rows must
    have its shape (flat rows of its size are taken too); `features` names the columns (else npz_columns(kind))."""
    with np.load(path, allow_pickle=False) as z:
        extra = sorted(set(z.files) - NPZ_ARRAYS)
        if extra or "X" not in z.files:
            raise DataValidationError(f"{path}: an .npz holds X (the rows) and y (the labels, optional in a batch); "
                                      f"it has {sorted(z.files)}")
        X, y = z["X"], (z["y"] if "y" in z.files else None)
    if X.ndim < 2:
        raise DataValidationError(f"{path}: X has shape {list(X.shape)}; it needs a first axis of rows, (N, ...)")
    if spec is not None and tuple(X.shape[1:]) not in (spec.shape, (spec.size,)):
        raise DataValidationError(
            f"{path}: X holds rows of shape {list(X.shape[1:])}; the model takes {spec.kind} rows of shape "
            f"{list(spec.shape)} ({spec.size} values). Send rows of that shape")
    if y is not None and y.shape != (len(X),):
        raise DataValidationError(f"{path}: y has shape {list(y.shape)}; it needs one label per row of X, "
                                  f"shape [{len(X)}]")
    names = features or npz_columns(X.shape[1:], spec.kind if spec else kind)
    df = pd.DataFrame(X.reshape(len(X), -1), columns=names)
    return df.assign(**{target: y}) if y is not None else df


def write_npz(df: pd.DataFrame, path: Path, target: str, shape: list[int] | None, dtype: str | None = None) -> Path:
    """The frame's feature columns (all but `target`) as X with rows of `shape` (flat when None) in `dtype` (None:
    the frame's), `target` as y."""
    features = [c for c in df.columns if c != target]
    X = df[features].to_numpy(dtype=dtype)
    X = X.reshape(len(X), *shape) if shape else X
    arrays = {"X": X} | ({"y": df[target].to_numpy(dtype="int64")} if target in df.columns else {})
    with open(path, "wb") as f:  # a file object: numpy would add .npz to a name without it (a .tmp file)
        np.savez(f, **arrays)
    return path


def check_batch_columns(columns: list[str], target: str, spec: InputSpec, source: Path | str) -> None:
    """A column batch for an image or sequence model has the spec's number of values per row; the error names the
    expected and found shape (the column check then names the columns). Tabular batches: check_columns alone."""
    n = len([c for c in columns if c != target])
    if spec.kind != "tabular" and n != spec.size:
        raise DataValidationError(
            f"{source}: rows of {n} values (shape [{n}]) do not match the model's input: {spec.kind} of shape "
            f"{list(spec.shape)}, {spec.size} values per row; send {spec.size} feature columns or an .npz with X "
            f"of shape (N, {', '.join(map(str, spec.shape))})")


def check_rows(values: np.ndarray, features: list[str], spec: InputSpec, source: Path | str) -> None:
    """Values a model of `spec` can take: a sequence's token ids within its vocabulary (images and tables: the
    schema's checks, finite numbers, suffice)."""
    if spec.kind == "sequence" and spec.vocab_size:
        check_ids(values, features, spec.vocab_size, source)
