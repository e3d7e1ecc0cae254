"""Production batches: find them in data/incoming, check them against the training schema, quarantine the bad.

A batch is a CSV or Parquet file of the training features, with or without the target column. Scoring
writes `<stem>.predictions.parquet` next to it; a batch without that file is still to be scored.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from pandera.errors import SchemaErrors

from ottimo.data import DataValidationError, raw_schema, read_table, summarise_errors

PREDICTIONS = ".predictions.parquet"


def pending(incoming: Path) -> list[Path]:
    """Batches not scored yet, oldest name first (predictions files are not batches)."""
    if not incoming.is_dir():
        return []
    files = [p for p in incoming.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".parquet")
             and not p.name.endswith(PREDICTIONS)]
    return sorted(p for p in files if not predictions_path(p).exists())


def predictions_path(batch: Path) -> Path:
    return batch.with_name(batch.stem + PREDICTIONS)


def schema_of(prepared: Path) -> dict:
    """The training schema recorded by `prepare` (features, target, labels)."""
    return json.loads((prepared / "schema.json").read_text())


def validate_batch(path: Path, schema: dict) -> pd.DataFrame:
    """Read a batch and check it against the training schema: every feature, finite numbers, labels (when the
    target column is there) among the training labels. Raises DataValidationError naming the problem."""
    df = read_table(path)
    features, target = schema["features"], schema["target"]
    if df.empty:
        raise DataValidationError(f"{path.name}: the batch has no rows")
    missing = [c for c in features if c not in df.columns]
    extra = [c for c in df.columns if c not in features and c != target]
    if missing or extra:
        raise DataValidationError(f"{path.name}: columns do not match the training schema: missing {missing[:10]}, "
                                  f"unexpected {extra[:10]}")
    checks = raw_schema(features, target, schema["labels"], min_rows=1)
    if target not in df.columns:
        checks = checks.remove_columns([target])
    try:
        return checks.validate(df, lazy=True)
    except SchemaErrors as err:
        raise DataValidationError(summarise_errors(err, path.name, "the batch was not scored")) from None


def quarantine(batch: Path, quarantine_dir: Path, reason: str) -> Path:
    """Move a malformed batch to the quarantine folder with `<name>.reason.txt` beside it; return the new path."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    dst = quarantine_dir / batch.name
    if dst.exists():  # a batch of the same name was quarantined before: keep both
        dst = quarantine_dir / f"{batch.stem}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}{batch.suffix}"
    shutil.move(str(batch), dst)
    dst.with_name(dst.name + ".reason.txt").write_text(
        f"{datetime.now(UTC).isoformat(timespec='seconds')} quarantined by the scoring flow\n{reason}\n")
    return dst


def write_predictions(batch: Path, pred: np.ndarray, labels: list[int], version: str) -> Path:
    """Predicted labels and the model version, one row per batch row, next to the batch."""
    out = predictions_path(batch)
    pd.DataFrame({"prediction": np.asarray(labels)[pred], "model_version": str(version)}).to_parquet(out, index=False)
    return out


def window(batches: list[Path], schema: dict) -> pd.DataFrame:
    """Concatenated scored batches (features, and the target where a batch has it; NaN where not)."""
    cols = schema["features"] + [schema["target"]]
    frames = [read_table(p).reindex(columns=cols) for p in batches]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
