"""The bad-input corpus (tests/helpers/bad_inputs.py) through the training pipeline's validate_raw task and the config
loader: each case is refused with a message naming the problem, a bad data file is kept in the quarantine, the
user's file and the data versions are untouched. README's table must match what the code says today."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ottimo.config import LimitsCfg
from ottimo.data.intake import quarantine
from tests.helpers import bad_inputs
from tests.helpers.bad_inputs import CASES, CONFIG, DATA, Case


@pytest.fixture(scope="module")
def good() -> pd.DataFrame:
    return bad_inputs.good_frame()


def test_the_corpus_covers_every_kind_of_bad_input_the_issue_names():
    ids = {c.id for c in CASES}
    assert len(CASES) >= 15 and len(ids) == len(CASES)
    assert {"nan", "inf", "missing-column", "extra-column", "wrong-dtype", "empty-file", "truncated-parquet",
            "non-utf8-csv", "duplicate-columns", "unknown-label", "zero-rows", "extreme-values", "target-text",
            "target-float", "config-bad-value", "config-path-traversal", "file-too-large", "index-column",
            "words-in-numbers", "missing-label"} <= ids


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@pytest.mark.parametrize("case", DATA, ids=lambda c: c.id)
def test_bad_data_is_refused_named_and_quarantined(case: Case, good, tmp_path):
    root, bad = bad_inputs.data_project(tmp_path, case, good)
    before = _stat(bad)
    small = before[0] < 10 << 20
    content = bad.read_bytes() if small else None

    msg = bad_inputs.data_error(case, root)

    for fragment in case.expect:
        assert fragment in msg, f"{fragment!r} not in: {msg}"
    assert "Quarantined:" in msg and "left as it was" in msg
    # the user's file is exactly as it was, and nothing was versioned, prepared or tracked
    assert _stat(bad) == before and (not small or bad.read_bytes() == content)
    assert not any((root / p).exists() for p in (".dvc", "dvc.lock", "data/prepared", "mlruns"))
    # the quarantine holds the reason, and a byte-identical copy unless the file is outside the project or too big
    folder = root / "data" / "quarantine"
    notes = list(folder.glob(f"{bad.name}.*.reason.txt"))
    assert len(notes) == 1 and case.expect[0] in notes[0].read_text()
    copies = [p for p in folder.iterdir() if p not in notes]
    if case.copied:
        assert len(copies) == 1 and copies[0].read_bytes() == content
        assert copies[0].name == notes[0].name.removesuffix(".reason.txt")
    else:
        assert copies == [] and "not copied" in notes[0].read_text()


@pytest.mark.parametrize("case", CONFIG, ids=lambda c: c.id)
def test_bad_config_is_refused_and_named(case: Case, tmp_path):
    msg = bad_inputs.config_error(case, bad_inputs.config_project(tmp_path, case))
    for fragment in case.expect:
        assert fragment in msg, f"{fragment!r} not in: {msg}"


def test_an_incoming_batch_is_moved_to_the_quarantine(good, tmp_path):
    """What the scoring flow does with a rejected batch: move it (a rename), with the reason beside it."""
    batch = tmp_path / "data" / "incoming" / "b1.csv"
    batch.parent.mkdir(parents=True)
    good.head(5).to_csv(batch, index=False)
    content = batch.read_bytes()
    kept, note = quarantine(tmp_path, batch, "column 'x' fails finite", LimitsCfg(), move=True)
    assert not batch.exists() and kept.read_bytes() == content and kept.parent == tmp_path / "data" / "quarantine"
    assert "moved here from" in note.read_text() and "column 'x' fails finite" in note.read_text()


def test_readme_table_is_generated_from_the_corpus():
    readme = bad_inputs.README.read_text()
    hint = "run `python -m tests.helpers.bad_inputs --readme`"
    assert bad_inputs.BEGIN in readme, f"README has no bad-input table: {hint}"
    assert bad_inputs.with_table(readme, bad_inputs.markdown()) == readme, (
        "README's bad-input table is stale: run `python -m tests.helpers.bad_inputs --readme`")
