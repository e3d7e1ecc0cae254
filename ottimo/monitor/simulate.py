"""Seeded drift simulator: batches drawn from held-out rows with a controlled shift of a given severity.

Kinds: none; shift (adds severity x the column's std to chosen features); scale (multiplies them by
1 + severity); noise (Gaussian, severity x std); rotate (images turned by severity x 45 degrees); blur
(Gaussian blur of sigma = severity pixels); prior (label shift: a share `severity` of the rows is redrawn
from the lower half of the classes); missing (a share `severity` of the values of chosen features set to NaN).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

KINDS = ("none", "shift", "scale", "noise", "rotate", "blur", "prior", "missing")


class SimulationError(ValueError):
    """The requested shift cannot be applied to this data (unknown kind, no image shape, bad severity)."""


def _columns(features: list[str], chosen: list[str] | None) -> list[str]:
    unknown = sorted(set(chosen or []) - set(features))
    if unknown:
        raise SimulationError(f"unknown feature column(s) {unknown[:5]}; pick from {features[:5]}...")
    return list(chosen) if chosen else list(features)


def _images(X: np.ndarray, shape: list[int] | None, fn) -> np.ndarray:
    """`fn` applied to every [H, W] plane of the rows as images of `shape` ([H, W], or [C, H, W]: per channel)."""
    if not shape or len(shape) not in (2, 3) or math.prod(shape) != X.shape[1]:
        raise SimulationError(f"image shifts need the features to form an image: card.image_shape is {shape}, "
                              f"features {X.shape[1]}; set card.image_shape (or data.input) or pick a tabular kind")
    planes = X.reshape(-1, *shape[-2:])
    return np.stack([fn(p) for p in planes]).reshape(len(X), -1)


def shift(df: pd.DataFrame, features: list[str], target: str | None, kind: str, severity: float, seed: int,
          columns: list[str] | None = None, image_shape: list[int] | None = None) -> pd.DataFrame:
    """A copy of `df` with one kind of shift applied at `severity` (0 = none), reproducible by `seed`."""
    if kind not in KINDS:
        raise SimulationError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if severity < 0:
        raise SimulationError(f"severity must be >= 0, got {severity}")
    rng = np.random.default_rng(seed)
    out = df.copy()
    cols = _columns(features, columns)
    std = df[cols].std(ddof=0).to_numpy()  # blank columns (std 0) stay blank
    if kind == "shift":
        out[cols] = df[cols].to_numpy() + severity * std
    elif kind == "scale":
        out[cols] = df[cols].to_numpy() * (1 + severity)
    elif kind == "noise":
        out[cols] = df[cols].to_numpy() + rng.normal(0, 1, (len(df), len(cols))) * severity * std
    elif kind in ("rotate", "blur"):
        X = df[features].to_numpy(dtype=float)
        if kind == "rotate":
            Y = _images(X, image_shape, lambda im: ndimage.rotate(im, severity * 45, reshape=False, order=1))
        else:
            Y = _images(X, image_shape, lambda im: ndimage.gaussian_filter(im, sigma=severity))
        out[features] = Y
    elif kind == "prior":
        if target is None or target not in df.columns:
            raise SimulationError("a prior (label) shift needs the target column in the source data")
        if severity > 1:
            raise SimulationError(f"prior severity is a share of rows, 0 to 1; got {severity}")
        labels = np.sort(df[target].unique())
        pool = df[df[target].isin(labels[: max(1, len(labels) // 2)])]
        redraw = rng.random(len(df)) < severity
        out.loc[redraw] = pool.sample(n=int(redraw.sum()), replace=True, random_state=seed).to_numpy()
    elif kind == "missing":
        if severity > 1:
            raise SimulationError(f"missing severity is a share of values, 0 to 1; got {severity}")
        mask = rng.random((len(df), len(cols))) < severity
        out[cols] = df[cols].mask(mask)
    return out


def batches(source: pd.DataFrame, features: list[str], target: str, kind: str, severity: float, n_batches: int,
            rows: int, seed: int, labels: bool = True, **kw) -> list[pd.DataFrame]:
    """`n_batches` batches of `rows` rows each, sampled with replacement from `source`, each shifted;
    without `labels` the target column is dropped (production data usually arrives unlabelled)."""
    if rows < 1 or n_batches < 1:
        raise SimulationError("rows and batches must be at least 1")
    out = []
    for i in range(n_batches):
        part = source.sample(n=rows, replace=rows > len(source), random_state=seed + i).reset_index(drop=True)
        part = shift(part, features, target, kind, severity, seed + i, **kw)
        out.append(part if labels else part.drop(columns=[target]))
    return out


def write(frames: list[pd.DataFrame], out_dir: Path, prefix: str, fmt: str = "parquet") -> list[Path]:
    """Write the batches as `<prefix>-NNN.<fmt>` (parquet or csv); return their paths."""
    if fmt not in ("parquet", "csv"):
        raise SimulationError(f"format must be parquet or csv, got {fmt!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, df in enumerate(frames):
        path = out_dir / f"{prefix}-{i:03d}.{fmt}"
        df.to_parquet(path, index=False) if fmt == "parquet" else df.to_csv(path, index=False)
        paths.append(path)
    return paths
