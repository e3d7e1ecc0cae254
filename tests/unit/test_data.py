"""Raw data checks (schema) and deterministic stratified splits."""

import numpy as np
import pandas as pd
import pytest

from ottimo.config import DataCfg
from ottimo.data.tables import DataValidationError, builtin_frame, load_splits, prepare, split_frame, validate_frame

CFG = DataCfg()


@pytest.fixture
def digits() -> pd.DataFrame:
    return builtin_frame("digits")


def test_builtin_digits_pass(digits, tmp_path):
    out = validate_frame(digits, CFG, tmp_path / "d.csv")
    assert out.shape == (1797, 65)


def test_splits_are_deterministic_stratified_and_disjoint(digits):
    a, b = split_frame(digits, CFG), split_frame(digits, CFG)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    idx = [set(p.index) for p in a.values()]
    assert sum(len(s) for s in idx) == len(digits) and len(set.union(*idx)) == len(digits)
    overall = digits["target"].value_counts(normalize=True).sort_index()
    for part in a.values():
        share = part["target"].value_counts(normalize=True).sort_index()
        assert np.abs(share - overall).max() < 0.02
    other = split_frame(digits, CFG.model_copy(update={"seed": 7}))
    assert set(other["test"].index) != set(a["test"].index)


def test_prepare_writes_splits_and_schema(digits, tmp_path):
    digits.to_csv(tmp_path / "raw.csv", index=False)
    cfg = CFG.model_copy(update={"path": "raw.csv"})
    sizes = prepare(tmp_path, cfg, tmp_path / "prepared")
    assert sum(sizes.values()) == len(digits)
    splits = load_splits(tmp_path / "prepared")
    assert splits.X_train.dtype == np.float32 and splits.labels == list(range(10))
    assert splits.X_test.shape == (sizes["test"], 64)


def _broken(digits, kind):
    df = digits.copy()
    if kind == "nan":
        df.loc[5, "pixel_0_3"] = np.nan
    elif kind == "inf":
        df.loc[9, "pixel_1_1"] = np.inf
    elif kind == "missing":
        df = df.drop(columns=["pixel_2_2"])
    elif kind == "extra":
        df["leak"] = 1.0
    elif kind == "dtype":
        df["pixel_3_3"] = df["pixel_3_3"].astype(str)
        df.loc[4, "pixel_3_3"] = "dark"
    elif kind == "label":
        df.loc[7, "target"] = 11
    elif kind == "rows":
        df = df.head(20)
    elif kind == "target":
        df = df.drop(columns=["target"])
    elif kind == "duplicate":
        df = pd.concat([df, df[["pixel_0_0"]]], axis=1)
    return df


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("nan", ["'pixel_0_3'", "rows [5]"]),
        ("inf", ["'pixel_1_1'", "finite", "rows [9]"]),
        ("missing", ["missing ['pixel_2_2']"]),
        ("extra", ["unexpected ['leak']"]),
        ("dtype", ["'pixel_3_3'", "dark"]),
        ("label", ["'target'", "unknown label(s) [11]", "rows [7]"]),
        ("rows", ["at least 100 rows"]),
        ("target", ["target column 'target' is missing"]),
        ("duplicate", ["duplicate column names ['pixel_0_0']"]),
    ],
)
def test_bad_raw_data_is_named(digits, tmp_path, kind, expected):
    with pytest.raises(DataValidationError) as err:
        validate_frame(_broken(digits, kind), CFG, tmp_path / "digits.csv")
    for fragment in expected:
        assert fragment in str(err.value)


def test_reproduce_says_what_dvc_did_even_when_the_lock_comes_out_identical(tmp_path):
    """A fresh clone has dvc.lock but no outputs and no cache: DVC runs the stage and writes the very same lock,
    which must still count as prepared (it was logged 'unchanged, prepare skipped')."""
    import shutil

    from ottimo.data import versioning

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "in.txt").write_text("a\n")
    (repo / "dvc.yaml").write_text("stages:\n  prepare:\n    cmd: mkdir -p out && cp in.txt out/x\n"
                                   "    deps: [in.txt]\n    outs: [out]\n")
    versioning.ensure_repo(repo)
    assert versioning.reproduce(repo) == versioning.RAN
    assert versioning.reproduce(repo) == versioning.SKIPPED
    shutil.rmtree(repo / "out")
    assert versioning.reproduce(repo) == versioning.RESTORED
    clone = tmp_path / "clone"  # what git would give: the sources and dvc.lock, no outputs, no DVC cache
    clone.mkdir()
    for name in ("in.txt", "dvc.yaml", "dvc.lock"):
        shutil.copy(repo / name, clone / name)
    versioning.ensure_repo(clone)
    lock = (clone / "dvc.lock").read_text()
    assert versioning.reproduce(clone) == versioning.RAN and (clone / "dvc.lock").read_text() == lock


def _prepared_files(root) -> dict[str, bytes]:
    out = root / "data" / "prepared"
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_ottimo_prepare_stage_runs_in_process_as_dvc_repro_would(tmp_path, monkeypatch):
    """dvc.yaml's prepare runs in this process (no DVC interpreter, no second import of the data stack): it says
    RAN / SKIPPED / RESTORED as `dvc repro` does, and writes the dvc.lock and the outputs that DVC running the
    command in a fresh interpreter writes."""
    import shutil
    from pathlib import Path

    import yaml

    from ottimo.config import load_params
    from ottimo.data import versioning
    from ottimo.data.tables import materialise_raw

    repo_root = Path(__file__).resolve().parents[2]
    roots = {}
    for name in ("here", "dvc"):
        root = roots[name] = tmp_path / name
        root.mkdir()
        for f in ("dvc.yaml", "params.yaml"):
            shutil.copy(repo_root / f, root / f)
        params = load_params(root / "params.yaml")
        materialise_raw(root, params.data)
        versioning.ensure_repo(root)
        versioning.track(root, params.data.path)
    assert "Running stage 'prepare'" in versioning.dvc(roots["dvc"], "repro", "prepare")  # DVC's own run

    def no_subprocess(*args):
        raise AssertionError(f"dvc {args[1:]} ran as a subprocess")

    here = roots["here"]
    monkeypatch.setattr(versioning, "dvc", no_subprocess)
    assert versioning.reproduce(here) == versioning.RAN
    assert (here / "dvc.lock").read_text() == (roots["dvc"] / "dvc.lock").read_text()
    assert _prepared_files(here) == _prepared_files(roots["dvc"])
    assert versioning.reproduce(here) == versioning.SKIPPED
    first = versioning.revision(here)

    shutil.rmtree(here / "data" / "prepared")  # outputs gone: back from DVC's cache, not recomputed
    assert versioning.reproduce(here) == versioning.RESTORED and _prepared_files(here) == _prepared_files(roots["dvc"])

    raw = yaml.safe_load((here / "params.yaml").read_text())
    raw["data"]["seed"] = 7  # a params change: another split, another revision
    (here / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert versioning.reproduce(here) == versioning.RAN and versioning.revision(here) != first
    raw["data"]["seed"] = 42  # and back: DVC's run cache has that run
    (here / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert versioning.reproduce(here) == versioning.RESTORED and versioning.revision(here) == first
