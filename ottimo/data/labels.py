"""Class labels: integers or text, fixed per data revision.

A target column of text holds text labels ("cat", "dog"); integer-valued numbers are integer labels (3.0 read back
from a CSV is 3). Refused, naming the rows: a missing or empty label, a fraction (3.5: a continuous target), a
column mixing numbers and text, and a label outside the known classes (data.labels, or the classes a model was
trained on). The sorted class list of the training data is the model's output order (output i is classes[i]):
`prepare` writes it to schema.json, and MLflow, the ONNX file and the model card record it. Pure functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ottimo import vocab
from ottimo.data.intake import DataValidationError

Label = int | str
SHOWN = 5  # values and rows a message names


def _rows(mask: pd.Series) -> list:
    return mask[mask].index.tolist()[:SHOWN]


def _few(values: pd.Series) -> list:
    """The first distinct values, in row order, as plain Python values."""
    return [v.item() if isinstance(v, np.generic) else v for v in dict.fromkeys(values.tolist())][:SHOWN]


def _missing(y: pd.Series) -> pd.Series:
    return y.isna() | y.map(lambda v: isinstance(v, str) and not v.strip())


def clean(y: pd.Series, target: str, source: Path | str) -> pd.Series:
    """The target column as labels: int64 for integer labels, Python str for text; DataValidationError names the
    rows of a missing label, a fraction or a mix of numbers and text."""
    if isinstance(y.dtype, pd.CategoricalDtype):
        y = y.astype(object)
    if pd.api.types.is_bool_dtype(y):
        y = y.astype(str)  # True/False: two text classes
    missing = _missing(y)
    if missing.any():
        raise DataValidationError(
            f"{source}: target {target!r} has no label at rows {_rows(missing)} ({int(missing.sum())} row(s)); "
            "every labelled row needs its class: fill them in or drop those rows")
    num = pd.to_numeric(y, errors="coerce")
    text = num.isna()
    if text.all():
        return y.astype(str).astype(object)
    if text.any():
        words, numbers = y[text], num[~text]
        whole = np.isfinite(numbers).all() and (numbers == np.floor(numbers)).all()
        numbers = numbers.astype("int64") if whole else numbers
        few = ("text", words, text, "numbers", numbers) if len(words) <= len(numbers) else \
            ("numbers", numbers, ~text, "text", words)
        raise DataValidationError(
            f"{source}: target {target!r} mixes numbers and text: {few[0]} {_few(few[1])} at rows {_rows(few[2])} "
            f"among {few[3]} such as {_few(few[4])[:3]}. Write every label the same way: all integers (0, 1, ...) "
            "or all text ('cat', 'dog', ...)")
    frac = ~np.isfinite(num) | (num != np.floor(num))
    if frac.any():
        raise DataValidationError(
            f"{source}: target {target!r} must hold class labels (integers or text); fractions "
            f"{_few(num[frac])} at rows {_rows(frac)}. A classifier cannot learn a continuous target")
    return num.astype("int64")


def check_known(y: pd.Series, target: str, source: Path | str, known: list, hint: str = "") -> None:
    """Raise DataValidationError when `y` (clean labels) holds a label outside `known`, naming the labels, their
    rows and the known classes; `hint` says what to do. Never a new class in silence."""
    unknown = ~y.isin(known)
    if unknown.any():
        raise DataValidationError(
            f"{source}: target {target!r} holds unknown label(s) {_few(y[unknown])} at rows {_rows(unknown)} "
            f"({int(unknown.sum())} row(s)); the known classes are {shown(known)}{hint}")


def shown(classes: list, limit: int = 20) -> str:
    """A class list for a message: all of it, or its first `limit` and how many more."""
    classes = list(classes)
    return str(classes) if len(classes) <= limit else f"{classes[:limit]} and {len(classes) - limit} more"


def classes(y: pd.Series, known: list | None = None) -> list[Label]:
    """The sorted class list: `known` (data.labels, a builtin's classes) when given, else the distinct labels of
    `y`; plain Python ints or strs, as schema.json and JSON answers carry them."""
    values = known if known is not None else pd.unique(y)
    return sorted(v.item() if isinstance(v, np.generic) else v for v in values)


def indices(y: pd.Series | np.ndarray, classes: list) -> np.ndarray:
    """Class indices 0..K-1 of labels `y` in the order of `classes` (what the model outputs); ValueError names a
    label that is not a class."""
    lookup = {c: i for i, c in enumerate(classes)}
    s = pd.Series(np.asarray(y, dtype=object))
    out = s.map(lookup)
    if out.isna().any():
        raise ValueError(f"labels {_few(s[out.isna()])} are not among the classes {shown(classes)}")
    return out.to_numpy(dtype=np.int64)


def parse(values: list, known: list) -> list[Label]:
    """Labels that came as JSON (POST /labels, late labels): each one of `known`, by value; an integer class also
    accepts 3.0, nothing accepts true/false. ValueError names the bad labels, their positions and the classes."""
    text = all(isinstance(c, str) for c in known)

    def one(v: object) -> Label | None:
        if isinstance(v, bool):
            return None
        if not text and isinstance(v, float) and v.is_integer():
            v = int(v)
        return v if (isinstance(v, str) if text else isinstance(v, int)) and v in known else None

    got = [one(v) for v in values]
    bad = [i for i, v in enumerate(got) if v is None]
    if bad:
        raise ValueError(f"unknown label(s) {[values[i] for i in bad][:SHOWN]} at positions {bad[:SHOWN]}; the known "
                         f"classes are {shown(known)}")
    return got


def as_json(classes: list) -> str:
    return json.dumps(list(classes), ensure_ascii=False)


def of_prepared(prepared: Path | str) -> list[Label]:
    """The class list a prepared data revision fixed (its schema.json)."""
    return json.loads((Path(prepared) / "schema.json").read_text())["labels"]


def tag_of(prepared: Path | str) -> str:
    """The class list of a prepared data revision as the value of an MLflow tag (vocab.CLASSES)."""
    return vocab.clip(as_json(of_prepared(prepared)))
