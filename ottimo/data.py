"""Raw data: write a builtin data set, read CSV/Parquet, validate it, split it.

`python -m ottimo.data prepare` is the command of the DVC `prepare` stage (see dvc.yaml).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors
from sklearn import datasets
from sklearn.model_selection import train_test_split

from ottimo.config import DataCfg, load_params

SPLITS = ("train", "val", "test", "reference")
BUILTINS = {
    "digits": datasets.load_digits,
    "breast_cancer": datasets.load_breast_cancer,
    "wine": datasets.load_wine,
}


class DataValidationError(ValueError):
    """A data file breaks the schema; the message names the columns and rows."""


@dataclass(frozen=True)
class Splits:
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    features: list[str]
    labels: list[int]


def builtin_frame(name: str, target: str = "target") -> pd.DataFrame:
    """One of scikit-learn's bundled data sets as a frame of float features and an int target."""
    bunch = BUILTINS[name]()
    df = pd.DataFrame(bunch.data.astype("float64"), columns=[str(c) for c in bunch.feature_names])
    df[target] = bunch.target.astype("int64")
    return df


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataValidationError(f"{path}: file not found")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as err:  # pandas and pyarrow raise many types for unreadable files
        raise DataValidationError(f"{path}: cannot be read as {path.suffix} ({err})") from None


def expected_columns(cfg: DataCfg, df: pd.DataFrame) -> tuple[list[str], list[int] | None]:
    """Feature names and labels the data must have: config first, then the builtin, then the file."""
    features, labels = cfg.features, cfg.labels
    if cfg.builtin and (features is None or labels is None):
        bunch = BUILTINS[cfg.builtin]()
        features = features or [str(c) for c in bunch.feature_names]
        labels = labels or sorted(int(v) for v in np.unique(bunch.target))
    if features is None:
        features = [c for c in df.columns if c != cfg.target]
    return list(features), labels


def raw_schema(features: list[str], target: str, labels: list[int] | None, min_rows: int) -> pa.DataFrameSchema:
    finite = pa.Check(lambda s: np.isfinite(s), element_wise=False, error="finite (no NaN or inf)")
    target_checks = [pa.Check.isin(labels)] if labels is not None else []
    return pa.DataFrameSchema(
        {f: pa.Column(float, checks=finite, coerce=True, nullable=False) for f in features}
        | {target: pa.Column(int, checks=target_checks, coerce=True, nullable=False)},
        strict=True,
        ordered=False,
        checks=pa.Check(lambda df: len(df) >= min_rows, error=f"at least {min_rows} rows"),
    )


def _summarise(err: SchemaErrors, path: Path, limit: int = 8) -> str:
    return summarise_errors(err, path, "nothing was prepared or trained", limit)


def summarise_errors(err: SchemaErrors, path: Path | str, consequence: str, limit: int = 8) -> str:
    """One line per failed (column, check) with the first rows and values; `consequence` says what was not done."""
    cases = err.failure_cases
    lines = [f"{path}: {len(cases)} schema violation(s); {consequence}."]
    for (column, check), group in cases.groupby(["column", "check"], dropna=False, sort=False):
        rows = [int(i) for i in group["index"].dropna().tolist()[:5]]
        values = group["failure_case"].tolist()[:5]
        where = f" at rows {rows}" if rows else ""
        col = column if isinstance(column, str) else "table"
        lines.append(f"  - column {col!r} fails {check}{where} (values {values})")
        if len(lines) > limit:
            lines.append("  - ...")
            break
    return "\n".join(lines)


def validate_frame(df: pd.DataFrame, cfg: DataCfg, source: Path) -> pd.DataFrame:
    """Check a raw frame against the schema; return it with coerced dtypes or raise DataValidationError."""
    if df.columns.duplicated().any():
        dupes = sorted(set(df.columns[df.columns.duplicated()]))
        raise DataValidationError(f"{source}: duplicate column names {dupes}")
    features, labels = expected_columns(cfg, df)
    if cfg.target not in df.columns:
        raise DataValidationError(f"{source}: target column {cfg.target!r} is missing (data.target in params)")
    missing = [c for c in features if c not in df.columns]
    extra = [c for c in df.columns if c not in features and c != cfg.target]
    if missing or extra:
        raise DataValidationError(
            f"{source}: columns do not match the schema: missing {missing[:10]}, unexpected {extra[:10]}"
            " (set data.features in params.yaml to the columns you want)"
        )
    try:
        return raw_schema(features, cfg.target, labels, cfg.min_rows).validate(df, lazy=True)
    except SchemaErrors as err:
        raise DataValidationError(_summarise(err, source)) from None


def materialise_raw(root: Path, cfg: DataCfg) -> Path:
    """Write the builtin data set to `data.path` if it is not there yet; return the raw path."""
    path = root / cfg.path
    if not path.exists():
        if cfg.builtin is None:
            raise DataValidationError(f"{path}: not found; put your CSV/Parquet file there or set data.builtin")
        path.parent.mkdir(parents=True, exist_ok=True)
        df = builtin_frame(cfg.builtin, cfg.target)
        df.to_parquet(path, index=False) if path.suffix == ".parquet" else df.to_csv(path, index=False)
    return path


def split_frame(df: pd.DataFrame, cfg: DataCfg) -> dict[str, pd.DataFrame]:
    """Stratified, seeded train / val / test / reference splits."""
    s = cfg.splits
    y = df[cfg.target]
    rest, reference = train_test_split(df, test_size=s.reference, stratify=y, random_state=cfg.seed)
    rest_y = rest[cfg.target]
    rest_train, test = train_test_split(
        rest, test_size=s.test / (1 - s.reference), stratify=rest_y, random_state=cfg.seed
    )
    train, val = train_test_split(
        rest_train,
        test_size=s.val / (s.train + s.val),
        stratify=rest_train[cfg.target],
        random_state=cfg.seed,
    )
    return {"train": train, "val": val, "test": test, "reference": reference}


def prepare(root: Path, cfg: DataCfg, out: Path) -> dict[str, int]:
    """Validate the raw file and write the splits plus schema.json to `out`; return split sizes."""
    raw = root / cfg.path
    df = validate_frame(read_table(raw), cfg, raw)
    features, labels = expected_columns(cfg, df)
    labels = sorted(labels or (int(v) for v in df[cfg.target].unique()))
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, part in split_frame(df[features + [cfg.target]], cfg).items():
        part.reset_index(drop=True).to_parquet(out / f"{name}.parquet", index=False)
        sizes[name] = len(part)
    schema = {"features": features, "target": cfg.target, "labels": labels, "sizes": sizes}
    (out / "schema.json").write_text(json.dumps(schema, indent=2))
    return sizes


def load_splits(prepared: Path) -> Splits:
    """Read the prepared splits as float32 features and int64 labels."""
    schema = json.loads((prepared / "schema.json").read_text())
    feats, target = schema["features"], schema["target"]
    arrays = {}
    for name in ("train", "val", "test"):
        df = pd.read_parquet(prepared / f"{name}.parquet")
        arrays[f"X_{name}"] = df[feats].to_numpy(dtype=np.float32)
        # class indices 0..K-1 in the order of schema["labels"] (sorted)
        arrays[f"y_{name}"] = np.searchsorted(schema["labels"], df[target].to_numpy()).astype(np.int64)
    return Splits(**arrays, features=feats, labels=schema["labels"])


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "prepare":
        print("usage: python -m ottimo.data prepare PARAMS_YAML", file=sys.stderr)
        return 2
    params_path = Path(argv[1]).resolve()
    params = load_params(params_path)
    sizes = prepare(params_path.parent, params.data, params_path.parent / "data" / "prepared")
    print(f"prepared {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
