"""Retraining must not learn the drift it was called for: which labelled window rows may join the training data.

A row is held back when it would fail the training data's own value checks (a missing or non-finite feature, a
label outside the known classes, a value beyond limits.max_abs_value) or when a feature lies far outside the
range the training data covers: beyond [min - m * range, max + m * range] with m = drift.holdback_margin (a
constant column's range counts as max(1, |value|)). Images and sequences are ranged on their summary features
(ottimo.monitor.summary: brightness and contrast per channel, quadrant means; length and token shares), not per
pixel or token id, and a sequence row with a token id outside the vocabulary is held back too. Held-back rows keep
their reason, per row; the user accepts them explicitly (drift.accept_drifted_rows, `ottimo drift-check
--accept-drifted`). Pure: pandas only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ottimo.monitor.summary import summary_frame
from ottimo.spec import InputSpec


@dataclass(frozen=True)
class Split:
    kept: pd.DataFrame
    held: pd.DataFrame  # the held-back rows, with a `holdback.reason` column
    summary: list[str] = field(default_factory=list)  # one line per reason, with counts and examples


REASON = "holdback.reason"


def split(rows: pd.DataFrame, training: pd.DataFrame, features: list[str], target: str,
          labels: list[int] | None, margin: float | None, max_abs: float | None,
          spec: InputSpec | None = None) -> Split:
    """Window rows that may join `training` (kept) and those held back (held, with the reason per row); `spec`:
    the rows' input kind (None: tabular)."""
    reasons = pd.Series("", index=rows.index, dtype=object)

    def flag(mask: pd.Series, why: pd.Series | str) -> None:
        new = mask & (reasons == "")
        reasons[new] = why[new] if isinstance(why, pd.Series) else why

    X = rows[features].apply(pd.to_numeric, errors="coerce").astype("float64")
    flag(~np.isfinite(X).all(axis=1), "a missing or non-finite feature value")
    if labels is not None:
        flag(~rows[target].isin(labels), f"label outside the training classes {labels[:10]}")
    if max_abs is not None:
        over = X.abs() > max_abs
        flag(over.any(axis=1), _first(over, X, f"beyond ±{max_abs:g} (limits.max_abs_value)"))
    if spec is not None and spec.kind == "sequence" and spec.vocab_size:
        ids = X.to_numpy()
        bad = pd.DataFrame((ids != np.floor(ids)) | (ids < 0) | (ids >= spec.vocab_size), X.index, X.columns)
        flag(bad.any(axis=1), _first(bad, X, f"a token id outside the vocabulary (0 .. {spec.vocab_size - 1})"))
    if margin is not None:
        ok = reasons == ""  # rows summarised: finite, in-vocabulary values
        T = summary_frame(training, features, spec, training).astype("float64")
        S = summary_frame(X[ok], features, spec, training).astype("float64")
        lo, hi = T.min(), T.max()
        span = (hi - lo).where(hi > lo, np.maximum(1.0, lo.abs()))
        out = (S < lo - margin * span) | (S > hi + margin * span)
        why = _first(out, S, f"far outside the training range (drift.holdback_margin {margin:g})", lo, hi)
        flag(out.any(axis=1).reindex(rows.index, fill_value=False), why.reindex(rows.index, fill_value=""))
    held = reasons != ""
    counts = reasons[held].map(lambda r: r.split(":")[0]).value_counts()
    summary = [f"{n} row(s): {why} (e.g. {reasons[held & reasons.str.startswith(why)].iloc[0]})"
               for why, n in counts.items()]
    return Split(rows[~held], rows[held].assign(**{REASON: reasons[held]}), summary)


def _first(mask: pd.DataFrame, X: pd.DataFrame, why: str, lo=None, hi=None) -> pd.Series:
    """Per row, `why` naming its first offending column and value (and the training range when known)."""
    def one(i) -> str:
        cols = mask.columns[mask.loc[i].to_numpy()]
        if not len(cols):
            return ""
        c = cols[0]
        where = "" if lo is None else f" [{lo[c]:g}, {hi[c]:g}]"
        return f"{why}: {c} = {X.at[i, c]:g}{where}" + (f" and {len(cols) - 1} more column(s)" if len(cols) > 1 else "")
    return pd.Series([one(i) for i in mask.index], index=mask.index, dtype=object)
