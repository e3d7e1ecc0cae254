"""Raw data: write a builtin data set, read CSV/Parquet, validate it, split it.

`python -m ottimo.data.tables prepare` is the command of the DVC `prepare` stage (see dvc.yaml).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors
from sklearn import datasets
from sklearn.model_selection import train_test_split

from ottimo.config import DataCfg, LimitsCfg, load_params
from ottimo.data import labels as lbl
from ottimo.data import sequences
from ottimo.data.inputs import check_npz_shape, derive_spec, input_of, read_npz, write_npz
from ottimo.data.intake import DataValidationError, preflight
from ottimo.spec import InputSpec

SPLITS = ("train", "val", "test", "reference")
BUILTINS = {
    "digits": datasets.load_digits,
    "breast_cancer": datasets.load_breast_cancer,
    "wine": datasets.load_wine,
}


@dataclass(frozen=True)
class Splits:
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    features: list[str]
    labels: list[int] | list[str]  # the classes, sorted: output i of the model is labels[i]
    spec: InputSpec | None = None  # one row as the model takes it; None: a flat table of the feature columns

    @property
    def input(self) -> InputSpec:
        return self.spec or InputSpec.tabular(self.X_train.shape[1])

    def rows(self, X: np.ndarray) -> np.ndarray:
        """Flat feature rows of these splits shaped and typed as the model takes them."""
        return self.input.rows(X)


def builtin_frame(name: str, target: str = "target") -> pd.DataFrame:
    """One of scikit-learn's bundled data sets as a frame of float features and an int target."""
    bunch = BUILTINS[name]()
    df = pd.DataFrame(bunch.data.astype("float64"), columns=[str(c) for c in bunch.feature_names])
    df[target] = bunch.target.astype("int64")
    return df


def builtin_data(cfg: DataCfg) -> pd.DataFrame:
    """data.builtin as a raw table: scikit-learn's bundled set, or the seeded `sequences` task."""
    return sequences.frame(cfg) if cfg.builtin == "sequences" else builtin_frame(cfg.builtin, cfg.target)


def builtin_columns(cfg: DataCfg) -> tuple[list[str], list[int]]:
    """The builtin's feature names and class labels (without generating or loading it where it can be helped)."""
    if cfg.builtin == "sequences":
        return sequences.feature_names(sequences.dimensions(cfg)[0]), list(range(cfg.sequences.classes))
    bunch = BUILTINS[cfg.builtin]()
    return [str(c) for c in bunch.feature_names], sorted(int(v) for v in np.unique(bunch.target))


def write_table(df: pd.DataFrame, path: Path, cfg: DataCfg, suffix: str | None = None) -> Path:
    """The raw table as CSV, Parquet or .npz (X of data.input's shape, y) by `suffix` (default: the path's)."""
    suffix = (suffix or path.suffix).lower()
    if suffix == ".npz":
        kind = cfg.input.kind
        return write_npz(df, path, cfg.target, cfg.input.shape if kind != "tabular" else None,
                         "int64" if kind == "sequence" else None)
    df.to_parquet(path, index=False) if suffix == ".parquet" else df.to_csv(path, index=False)
    return path


def read_table(path: Path, target: str = "target", kind: str | None = None) -> pd.DataFrame:
    """A CSV, Parquet or .npz file (ottimo.data.inputs.read_npz: X, y as `target`, columns named for the input
    `kind`) as a frame."""
    if not path.is_file():
        raise DataValidationError(f"{path}: file not found")
    fmt = {".parquet": "Parquet", ".npz": "npz"}.get(path.suffix.lower(), "CSV")
    try:
        if fmt == "npz":
            return read_npz(path, target, kind)
        if fmt == "Parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except UnicodeDecodeError as err:
        raise DataValidationError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataValidationError(f"{path}: the file is empty (no header row); write the data again") from None
    except DataValidationError:
        raise
    except Exception as err:  # pandas, pyarrow and numpy raise many types for unreadable files
        raise DataValidationError(f"{path}: cannot be read as {fmt}, truncated or corrupt ({err})") from None


def expected_columns(cfg: DataCfg, df: pd.DataFrame) -> tuple[list[str], list | None]:
    """Feature names and labels the data must have: config first, then the builtin, then the file."""
    features, labels = cfg.features, cfg.labels
    if cfg.builtin and (features is None or labels is None):
        names, classes = builtin_columns(cfg)
        npz = Path(cfg.path).suffix.lower() == ".npz"  # an .npz names its columns by their place (npz_columns)
        features = features or (None if npz else names)
        labels = labels or classes
    if features is None:
        features = [c for c in df.columns if c != cfg.target]
    return list(features), labels


def raw_schema(features: list[str], target: str, min_rows: int) -> pa.DataFrameSchema:
    """Finite float features; the target column is only allowed here (ottimo.data.labels checks its labels)."""
    finite = pa.Check(lambda s: np.isfinite(s), element_wise=False, error="finite (no NaN or inf)")
    return pa.DataFrameSchema(
        {f: pa.Column(float, checks=finite, coerce=True, nullable=False) for f in features}
        | {target: pa.Column(nullable=True)},
        strict=True,
        ordered=False,
        checks=pa.Check(lambda df: len(df) >= min_rows, error=f"at least {min_rows} rows"),
    )


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


def _rows(mask: pd.Series) -> list:
    return mask[mask].index.tolist()[:5]


UNNAMED = re.compile(r"Unnamed: \d+")  # what pandas calls a CSV column whose header cell is empty


def _unnamed(name: object) -> bool:
    return not str(name).strip() or bool(UNNAMED.fullmatch(str(name)))


def index_column(df: pd.DataFrame, source: Path | str, policy: str = "refuse") -> pd.DataFrame:
    """A leading column without a name is a row index written with the data (pandas' `df.to_csv(path)` writes one
    unless index=False; read back it is "Unnamed: 0"), never a feature: `policy` "drop" (data.index_column) drops
    it, "refuse" raises saying how to fix the file. A column without a name anywhere else is refused either way."""
    if len(df.columns) and _unnamed(df.columns[0]):
        if policy == "drop":
            df = df.drop(columns=df.columns[0])
        else:
            first = df.iloc[:, 0]
            counts = pd.api.types.is_integer_dtype(first) and first.tolist() == list(range(len(df)))
            raise DataValidationError(
                f"{source}: the first column has no name in the header (read as {str(df.columns[0])!r})"
                f"{', holds 0..' + str(len(df) - 1) if counts and len(df) else ''}: a row index written with the "
                "data (pandas writes one unless index=False), not a feature. Write the file with "
                "df.to_csv(path, index=False), or set data.index_column: drop in params.yaml to drop it")
    nameless = [i + 1 for i, c in enumerate(df.columns) if _unnamed(c)]
    if nameless:
        raise DataValidationError(f"{source}: column(s) {nameless[:10]} (counting from 1) have no name in the header; "
                                  "name every column, or remove the ones without a name")
    return df


def check_numbers(df: pd.DataFrame, features: list[str], source: Path | str, hint: str = "") -> None:
    """Feature cells holding text where a number belongs ("unknown", "?"; "n/a" and empty cells are read as
    missing): per column a few of the values and their rows, instead of the cast's raw TypeError."""
    found = []
    for c in features:
        col = df[c]
        if pd.api.types.is_numeric_dtype(col):
            continue
        text = col.notna() & pd.to_numeric(col, errors="coerce").isna()
        if text.any():
            values = list(dict.fromkeys(col[text].tolist()))[:5]
            found.append(f"  - column {c!r}: {values} at rows {_rows(text)} ({int(text.sum())} cell(s))")
    if found:
        raise DataValidationError("\n".join([
            f"{source}: {len(found)} feature column(s) hold text where numbers belong:", *found[:10],
            "Every feature is a number: fix those cells (a missing value is refused too: fill it in or drop the "
            f"row){hint}"]))


def check_target(df: pd.DataFrame, target: str, labels: list | None, source: Path, hint: str = "") -> pd.Series:
    """The target's labels (ottimo.data.labels.clean: integers or text, no missing label, no fraction, not mixed),
    each among `labels` when given; returns them cleaned or raises DataValidationError naming the rows."""
    y = lbl.clean(df[target], target, source)
    if labels is not None:
        lbl.check_known(y, target, source, labels, hint)
    return y


def check_bounds(df: pd.DataFrame, features: list[str], bound: float | None, source: Path) -> None:
    """Finite values beyond ±bound (limits.max_abs_value): corrupt cells such as 1e300 or sentinels like -9e99."""
    if bound is None:
        return
    over = df[features].abs() > bound
    if over.to_numpy().any():
        cols = [c for c in features if over[c].any()]
        rows = _rows(over.any(axis=1))
        raise DataValidationError(
            f"{source}: values beyond ±{bound:g} (limits.max_abs_value) in columns {cols[:10]} at rows {rows}, "
            f"e.g. {float(df.loc[rows[0], cols[0]]):g}; fix the file, or raise or null limits.max_abs_value")


@dataclass(frozen=True)
class Wording:
    """What check_table's messages say beyond the facts, so training data and production batches are checked by
    one function and still told apart: each field ends the message it names. The defaults speak of training data."""

    schema: str = "the schema"  # "columns do not match <schema>: ..."
    duplicate: str = ""  # after "duplicate column names [...]"
    mismatch: str = " (set data.features in params.yaml to the columns you want)"  # after "unexpected [...]"
    empty: str = ""  # after "no data rows, only a header; "
    consequence: str = "nothing was prepared or trained"  # what a schema violation stopped (summarise_errors)
    unknown: str = ". Fix the label, or list every class in data.labels"  # after "the known classes are [...]"
    text: str = ", or leave a column of text out (data.features lists the features)"  # after check_numbers' advice


def check_columns(source: str, columns: list[str], features: list[str], target: str | None,
                  schema: str = "the training schema", hint: str = "") -> None:
    """Raise DataValidationError unless `columns` are the training features (and the target, when one is allowed),
    naming what is missing and what is unexpected (and `hint`, what to do)."""
    missing = [c for c in features if c not in columns]
    extra = [c for c in columns if c not in features and c != target]
    if missing or extra:
        raise DataValidationError(f"{source}: columns do not match {schema}: missing {missing[:10]}, "
                                  f"unexpected {extra[:10]}{hint}")


def check_table(df: pd.DataFrame, features: list[str], target: str, labels: list | None, source: Path,
                wording: Wording, min_rows: int = 1, bound: float | None = None,
                target_required: bool = True) -> pd.DataFrame:
    """The checks training data and production batches share: unique column names, the target (when required),
    exactly the features (and the target), at least one row and `min_rows`, numbers in every feature, class labels
    (integers or text) among `labels`, finite numbers within ±bound. Returns the frame with coerced dtypes (the
    target as ottimo.data.labels.clean makes it) or raises DataValidationError."""
    if df.columns.duplicated().any():
        dupes = sorted(set(df.columns[df.columns.duplicated()]))
        raise DataValidationError(f"{source}: duplicate column names {dupes}{wording.duplicate}")
    if target_required and target not in df.columns:
        raise DataValidationError(f"{source}: target column {target!r} is missing (data.target in params)")
    check_columns(str(source), list(df.columns), features, target, wording.schema, wording.mismatch)
    if len(df) == 0:
        raise DataValidationError(f"{source}: no data rows, only a header; {wording.empty}")
    if len(df) < min_rows:
        raise DataValidationError(f"{source}: only {len(df)} rows; at least {min_rows} rows (data.min_rows) are "
                                  "needed to split and train. Add rows or lower data.min_rows")
    check_numbers(df, features, source, wording.text)
    checks = raw_schema(features, target, min_rows)
    y = None
    if target in df.columns:  # a batch may come without labels; one that has the column has a label on every row
        y = check_target(df, target, labels, source, wording.unknown)
    else:
        checks = checks.remove_columns([target])
    try:
        out = checks.validate(df, lazy=True)
    except SchemaErrors as err:
        raise DataValidationError(summarise_errors(err, source, wording.consequence)) from None
    check_bounds(out, features, bound, source)
    return out if y is None else out.assign(**{target: y})


def validate_frame(df: pd.DataFrame, cfg: DataCfg, source: Path, limits: LimitsCfg | None = None) -> pd.DataFrame:
    """Check a raw frame against the schema (and `limits.max_abs_value`); return it with coerced dtypes or
    raise DataValidationError."""
    check_npz_shape(Path(source), input_of(cfg))
    df = index_column(df, source, cfg.index_column)
    features, labels = expected_columns(cfg, df)
    return check_table(df, features, cfg.target, labels, source,
                       Wording(empty=f"at least data.min_rows = {cfg.min_rows}"), cfg.min_rows,
                       (limits or LimitsCfg()).max_abs_value)


def materialise_raw(root: Path, cfg: DataCfg) -> Path:
    """Write the builtin data set to `data.path` if it is not there yet; return the raw path."""
    path = root / cfg.path
    if not path.exists():
        if cfg.builtin is None:
            raise DataValidationError(f"{path}: not found; put your CSV/Parquet/.npz file there or set data.builtin")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table(builtin_data(cfg), path, cfg)
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


def read_checked(root: Path, path: Path, limits: LimitsCfg, cfg: DataCfg | None = None) -> pd.DataFrame:
    """The file read into a frame after every check that needs no reading (ottimo.data.intake.preflight); an .npz
    with `cfg`'s target and input kind."""
    preflight(root, path, limits)
    return read_table(path, *((cfg.target, cfg.input.kind) if cfg is not None else ()))


def prepare(root: Path, cfg: DataCfg, out: Path, limits: LimitsCfg | None = None) -> dict[str, int]:
    """Validate the raw file and write the splits plus schema.json to `out`; return split sizes."""
    raw = root / cfg.path
    limits = limits or LimitsCfg()
    df = validate_frame(read_checked(root, raw, limits, cfg), cfg, raw, limits)
    features, labels = expected_columns(cfg, df)
    labels = lbl.classes(df[cfg.target], labels)  # fixed for this data revision: the model's output order
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, part in split_frame(df[features + [cfg.target]], cfg).items():
        part.reset_index(drop=True).to_parquet(out / f"{name}.parquet", index=False)
        sizes[name] = len(part)
    spec = derive_spec(input_of(cfg), features, df[features], raw)
    schema = {"features": features, "target": cfg.target, "labels": labels, "sizes": sizes, "input": spec.as_dict()}
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
        arrays[f"y_{name}"] = lbl.indices(df[target], schema["labels"])  # 0..K-1 in schema["labels"]'s order
    spec = InputSpec.from_dict(schema["input"]) if "input" in schema else None
    return Splits(**arrays, features=feats, labels=schema["labels"], spec=spec)


class UsageError(ValueError):
    """The stage command's arguments are not `prepare PARAMS_YAML`."""


def run_stage(argv: list[str], wdir: Path) -> dict[str, int]:
    """dvc.yaml's prepare command, `prepare PARAMS_YAML` (relative to `wdir`, the stage's folder): the splits go to
    data/prepared beside the params file; return their sizes. UsageError, with the usage, on other arguments."""
    if len(argv) != 2 or argv[0] != "prepare":
        raise UsageError("usage: python -m ottimo.data.tables prepare PARAMS_YAML")
    params_path = (wdir / argv[1]).resolve()
    params = load_params(params_path)
    return prepare(params_path.parent, params.data, params_path.parent / "data" / "prepared", params.limits)


def main(argv: list[str]) -> int:
    try:
        sizes = run_stage(argv, Path.cwd())
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"prepared {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
