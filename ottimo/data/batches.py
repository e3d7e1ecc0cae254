"""Production batches: find them in data/incoming, check them as training data is checked, quarantine the bad.

A batch is a CSV or Parquet file of the training features, with or without the target column, or (for any input
kind) an .npz of X with the model's row shape and optionally y (ottimo.data.inputs.read_npz). It passes the
same pre-read guards as training data (ottimo.data.intake: inside the project, size and row limits, UTF-8, no
duplicate header) and the same schema checks, and a rejected batch is moved to the same quarantine. Scoring
writes `<stem>.predictions.parquet` next to it (atomically); a batch without that file is still to be scored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ottimo.config import LimitsCfg
from ottimo.data import inputs, intake
from ottimo.data.tables import Wording, check_table, index_column, read_table

PREDICTIONS = ".predictions.parquet"
BATCH_SUFFIXES = (".csv", ".parquet", ".npz")
BATCH = Wording(schema="the training schema", duplicate="; every column needs its own name", mismatch="",
                empty="the batch has nothing to score", consequence="the batch was not scored",
                unknown=" (the model was trained on these alone). Fix the label, or add rows of the new class to "
                        "the training data and retrain", text="")


def pending(incoming: Path) -> list[Path]:
    """Batches not scored yet, oldest name first (predictions files are not batches)."""
    if not incoming.is_dir():
        return []
    files = [p for p in incoming.iterdir() if p.is_file() and p.suffix.lower() in BATCH_SUFFIXES
             and not p.name.endswith(PREDICTIONS)]
    return sorted(p for p in files if not predictions_path(p).exists())


def predictions_path(batch: Path) -> Path:
    return batch.with_name(batch.stem + PREDICTIONS)


def schema_of(prepared: Path) -> dict:
    """The training schema recorded by `prepare` (features, target, labels)."""
    return json.loads((prepared / "schema.json").read_text())


def validate_batch(root: Path, path: Path, schema: dict, limits: LimitsCfg, index: str = "refuse") -> pd.DataFrame:
    """Check a batch as training data is checked: the pre-read guards (intake.preflight), a leading column without
    a name (`index`: data.index_column), then every feature, finite numbers within limits.max_abs_value and, when
    the target column is there, a label on every row among the training classes (an unknown one is named, never
    taken for a new class). Raises DataValidationError naming the problem."""
    intake.preflight(root, path, limits)
    spec, source = inputs.spec_of(schema), Path(path.name)
    df = read_batch(path, schema)
    if path.suffix.lower() != ".npz":
        df = index_column(df, source, index)
        inputs.check_batch_columns(list(df.columns), schema["target"], spec, source)
    out = check_table(df, schema["features"], schema["target"], schema["labels"], source,
                      BATCH, bound=limits.max_abs_value, target_required=False)
    inputs.check_rows(out[schema["features"]].to_numpy(), schema["features"], spec, source)
    return out


def read_batch(path: Path, schema: dict) -> pd.DataFrame:
    """A batch as a frame: a table as it is, an .npz with its X's rows (which must have the model's shape) as the
    training feature columns and y as the target."""
    if path.suffix.lower() == ".npz":
        return inputs.read_npz(path, schema["target"], features=schema["features"], spec=inputs.spec_of(schema))
    return read_table(path)


def quarantine(root: Path, batch: Path, reason: str, limits: LimitsCfg) -> tuple[Path | None, Path]:
    """Move a rejected batch to limits.quarantine_dir with a reason file: intake.quarantine(move=True)."""
    return intake.quarantine(root, batch, reason, limits, move=True)


def write_predictions(batch: Path, pred: np.ndarray, labels: list, version: str) -> Path:
    """Predicted labels (the classes as the training data wrote them: integers or text; `pred` indexes `labels`)
    and the model version, one row per batch row, next to the batch."""
    out = predictions_path(batch)
    tmp = out.with_name(out.name + ".tmp")  # not a batch, not a predictions file: a crash leaves no half file
    pd.DataFrame({"prediction": np.asarray(labels)[pred], "model_version": str(version)}).to_parquet(tmp, index=False)
    os.replace(tmp, out)
    return out


def window(batches: list[Path], schema: dict) -> pd.DataFrame:
    """Concatenated scored batches (features, and the target where a batch has it; NaN where not)."""
    cols = schema["features"] + [schema["target"]]
    frames = [read_batch(p, schema).reindex(columns=cols) for p in batches]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
