"""What one input row of a model is: the record a model family's builder receives (`build(spec, n_classes, ...)`).

The prepared data's schema.json holds it (`prepare` derives it from `data.input`), so training, export, scoring and
drift checks all read the same description. Rows travel as flat feature columns (tables, batches, parquet splits);
`InputSpec.rows` gives them the model's shape and dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

InputKind = Literal["tabular", "image", "sequence"]
DTYPES = {"tabular": "float32", "image": "float32", "sequence": "int64"}


@dataclass(frozen=True)
class InputSpec:
    """One row: `kind`, its `shape` without the batch axis ((n_features,), (C, H, W) or (length,)) and `dtype`;
    sequences also carry `vocab_size` (token ids are 0 .. vocab_size - 1) and `pad_id`."""

    kind: InputKind
    shape: tuple[int, ...]
    dtype: str
    vocab_size: int | None = None
    pad_id: int | None = None

    @property
    def size(self) -> int:
        """Values per row: the number of feature columns it is stored as."""
        return math.prod(self.shape)

    def rows(self, X: np.ndarray) -> np.ndarray:
        """Flat rows (N, size), or rows already shaped, as the model takes them: (N, *shape) in `dtype`."""
        X = np.asarray(X)
        if X.ndim == 1 + len(self.shape) and tuple(X.shape[1:]) == self.shape:
            return np.ascontiguousarray(X, dtype=self.dtype)
        if X.ndim != 2 or X.shape[1] != self.size:
            raise ValueError(f"rows of shape {tuple(X.shape[1:])} do not match the model's input {self.describe()}")
        return np.ascontiguousarray(X.reshape(len(X), *self.shape), dtype=self.dtype)

    def describe(self) -> str:
        return f"{self.kind} {list(self.shape)} {self.dtype}"

    def as_dict(self) -> dict:
        return asdict(self) | {"shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(d["kind"], tuple(int(s) for s in d["shape"]), d["dtype"], d.get("vocab_size"), d.get("pad_id"))

    @classmethod
    def tabular(cls, n_features: int) -> InputSpec:
        return cls("tabular", (n_features,), "float32")
