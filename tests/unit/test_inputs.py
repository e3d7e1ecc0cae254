"""Inputs beyond flat tables (data.input): images and token sequences from columns or .npz files, the seeded
`sequences` builtin, and the checks training data, scoring batches and served requests pass for each kind."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ottimo.config import ConfigError, DataCfg, LimitsCfg, parse_params
from ottimo.data import batches, intake, sequences
from ottimo.data.inputs import npz_columns, read_npz, spec_of
from ottimo.data.tables import (
    DataValidationError,
    builtin_frame,
    load_splits,
    materialise_raw,
    prepare,
    read_table,
    validate_frame,
    write_table,
)
from ottimo.serving import requests as rq
from ottimo.spec import InputSpec

IMAGE = {"kind": "image", "shape": [1, 8, 8]}
SEQ = {"kind": "sequence"}
LIMITS = LimitsCfg()


def prepared(root: Path, **data) -> dict:
    cfg = DataCfg(**data)
    materialise_raw(root, cfg)
    prepare(root, cfg, root / "prepared")
    return json.loads((root / "prepared" / "schema.json").read_text())


def esc(text: str) -> str:
    return text.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")


# --- training data ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["data/raw/digits.csv", "data/raw/digits.parquet", "data/raw/digits.npz"])
def test_digits_prepare_as_an_image_from_columns_or_npz(tmp_path, path):
    schema = prepared(tmp_path, path=path, builtin="digits", input=IMAGE)
    assert schema["input"] == {"kind": "image", "shape": [1, 8, 8], "dtype": "float32", "vocab_size": None,
                               "pad_id": None}
    splits = load_splits(tmp_path / "prepared")
    rows = splits.rows(splits.X_train)
    assert rows.shape == (len(splits.X_train), 1, 8, 8) and rows.dtype == np.float32
    assert len(splits.features) == 64 and sum(schema["sizes"].values()) == 1797
    if path.endswith(".npz"):  # X (N, 1, 8, 8) on disk, read back as named flat columns
        with np.load(tmp_path / path) as z:
            assert z["X"].shape == (1797, 1, 8, 8) and z["y"].shape == (1797,)
        assert splits.features[:2] == ["pixel_0_0_0", "pixel_0_0_1"] and splits.features[-1] == "pixel_0_7_7"
    # the same pixels in the same places whatever the file: (C, H, W) flattened row-major, as digits' columns are
    prepared(tmp_path / "csv", path="digits.csv", builtin="digits", input=IMAGE)
    columns = load_splits(tmp_path / "csv" / "prepared")
    assert np.array_equal(splits.X_train, columns.X_train) and np.array_equal(splits.y_test, columns.y_test)


def test_npz_rows_must_have_the_configured_shape(tmp_path):
    digits = builtin_frame("digits")
    X, y = digits.drop(columns="target").to_numpy(), digits["target"].to_numpy()
    raw = tmp_path / "raw.npz"
    np.savez(raw, X=X.reshape(-1, 1, 4, 16), y=y)  # 64 values per row, but not an 8 x 8 image
    cfg = DataCfg(path="raw.npz", builtin=None, input=IMAGE)
    with pytest.raises(DataValidationError, match=esc("X holds rows of shape [1, 4, 16], data.input (image) "
                                                      "expects [1, 8, 8]")):
        prepare(tmp_path, cfg, tmp_path / "prepared")
    np.savez(raw, X=X, y=y)  # flat rows: an image needs (N, C, H, W)
    with pytest.raises(DataValidationError, match=esc("shape [64]")):
        validate_frame(read_table(raw), cfg, raw)
    np.savez(raw, X=X.reshape(-1, 1, 8, 8), y=y)
    assert prepare(tmp_path, cfg, tmp_path / "prepared")["train"] == 1077


def test_npz_guards_look_before_loading(tmp_path):
    raw = tmp_path / "raw.npz"
    np.savez(raw, X=np.zeros((30, 1, 2, 2)), y=np.zeros(30, dtype=int))
    assert intake.count_rows(raw) == 30 and intake.npz_arrays(raw)["X"][0] == (30, 1, 2, 2)
    with pytest.raises(DataValidationError, match="limits.max_rows = 20"):
        intake.preflight(tmp_path, raw, LIMITS.model_copy(update={"max_rows": 20}))
    np.savez(raw, X=np.array([[1, "a"]], dtype=object), y=np.zeros(1))
    with pytest.raises(DataValidationError, match="numbers only"):
        intake.preflight(tmp_path, raw, LIMITS)
    np.savez(raw, rows=np.zeros((3, 2)))
    with pytest.raises(DataValidationError, match="no array X"):
        intake.preflight(tmp_path, raw, LIMITS)
    np.savez(raw, X=np.zeros((3, 2)), y=np.zeros(3), w=np.ones(3))
    with pytest.raises(DataValidationError, match="holds X .* and y"):
        read_npz(raw)
    raw.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataValidationError, match="not a complete .npz"):
        intake.preflight(tmp_path, raw, LIMITS)
    big = tmp_path / "big.npz"
    np.savez_compressed(big, X=np.zeros((2000, 1000)), y=np.zeros(2000))  # 16 MB decoded, a few KB on disk
    with pytest.raises(DataValidationError, match="decodes to 15.3 MB"):
        intake.preflight(tmp_path, big, LIMITS.model_copy(update={"max_file_mb": 10}))


def test_npz_column_names_follow_the_input_kind():
    assert npz_columns((2, 1, 2)) == ["pixel_0_0_0", "pixel_0_0_1", "pixel_1_0_0", "pixel_1_0_1"]
    assert npz_columns((3,), "sequence") == ["token_0", "token_1", "token_2"]
    assert npz_columns((2,), "tabular") == ["value_0", "value_1"]


def test_write_table_round_trips_an_npz_sequence_as_int_ids(tmp_path):
    cfg = DataCfg(path="s.npz", builtin="sequences", input={"kind": "sequence", "shape": [12], "vocab_size": 50},
                  sequences={"rows": 40})
    df = sequences.frame(cfg).astype("float64")  # validate_frame coerces features to float
    tmp = write_table(df, tmp_path / ".s.npz.tmp", cfg, suffix=".npz")  # as the drift check's append writes it
    assert tmp.name == ".s.npz.tmp"  # numpy adds no .npz to the name: the rename over the raw file finds it
    tmp.replace(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        assert z["X"].dtype == np.int64 and z["X"].shape == (40, 12)
    back = read_table(tmp_path / "s.npz", "target", "sequence")
    assert list(back.columns) == sequences.feature_names(12) + ["target"]
    assert np.array_equal(back.to_numpy(), df.to_numpy())


# --- the sequences builtin ----------------------------------------------------------------------------------------

def test_the_sequences_builtin_is_seeded_padded_and_within_its_vocabulary():
    cfg = DataCfg(path="s.parquet", builtin="sequences", input=SEQ)
    a, b = sequences.frame(cfg), sequences.frame(cfg)
    assert a.equals(b) and not a.equals(sequences.frame(cfg.model_copy(update={"seed": 1})))
    X, y = a.drop(columns="target").to_numpy(), a["target"].to_numpy()
    assert X.shape == (2000, 32) and X.min() >= 0 and X.max() < 200
    assert np.bincount(y).tolist() == [500] * 4  # balanced classes
    lengths = (X != 0).sum(axis=1)
    assert lengths.min() >= 8 and lengths.max() == 32 and lengths.std() > 5  # variable true lengths ...
    assert all((row[n:] == 0).all() and (row[:n] != 0).all() for row, n in zip(X, lengths, strict=True))  # padded


def test_a_larger_sequences_profile_is_only_settings(tmp_path):
    schema = prepared(tmp_path, path="data/raw/seq.parquet", builtin="sequences",
                      input={"kind": "sequence", "shape": [128], "vocab_size": 2048, "pad_id": 0},
                      sequences={"rows": 6000, "classes": 6, "markers": 5, "min_length": 16})
    assert schema["input"] == {"kind": "sequence", "shape": [128], "dtype": "int64", "vocab_size": 2048, "pad_id": 0}
    assert schema["labels"] == list(range(6)) and sum(schema["sizes"].values()) == 6000
    assert load_splits(tmp_path / "prepared").rows(np.zeros((1, 128))).dtype == np.int64


def test_the_sequences_builtin_defaults_and_a_non_zero_padding_id(tmp_path):
    schema = prepared(tmp_path, path="s.npz", builtin="sequences", input={"kind": "sequence", "pad_id": 199})
    assert schema["input"]["shape"] == [32] and schema["input"]["vocab_size"] == 200
    X = load_splits(tmp_path / "prepared").X_train
    assert (X == 199).any() and (X[:, :8] != 199).all()  # the first min_length tokens are never padding


def test_sequence_ids_are_checked_naming_column_row_and_value(tmp_path):
    df = sequences.frame(DataCfg(path="s.csv", builtin="sequences", input=SEQ))
    df.loc[7, "token_3"] = 250
    df.to_csv(tmp_path / "s.csv", index=False)
    cfg = DataCfg(path="s.csv", builtin=None, input={"kind": "sequence", "vocab_size": 200})
    with pytest.raises(DataValidationError, match=esc("column 'token_3' row 7 holds 250, which is outside "
                                                      "data.input.vocab_size (ids 0 .. 199)")):
        prepare(tmp_path, cfg, tmp_path / "prepared")
    df.loc[7, "token_3"] = 2.5
    df.to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(DataValidationError, match="column 'token_3' row 7 holds 2.5, which is not a token id"):
        prepare(tmp_path, cfg, tmp_path / "prepared")
    df.loc[7, "token_3"] = 5
    df.to_csv(tmp_path / "s.csv", index=False)
    assert prepare(tmp_path, cfg.model_copy(update={"input": cfg.input.model_copy(update={"vocab_size": None})}),
                   tmp_path / "prepared")["train"] == 1200


def test_input_settings_are_validated():
    assert DataCfg(path="data/raw/x.npz").path == "data/raw/x.npz"
    cases = [({"builtin": "sequences"}, "set data.input to {kind: sequence}"),
             ({"input": {"kind": "sequence", "vocab_size": 10, "pad_id": 10}}, "pad_id 10 is outside vocab_size 10"),
             ({"builtin": "sequences", "input": SEQ, "sequences": {"planted": 2, "distractors": 2}},
              "distractors (2) must be fewer than planted (2)"),
             ({"path": "data/raw/x.npy"}, ".npz (arrays X and y)")]
    for data, message in cases:
        with pytest.raises(ConfigError, match=esc(message)):
            parse_params({"data": data})
    with pytest.raises(ValueError, match="too small"):
        sequences.generate(DataCfg().sequences, 32, 12, 0, seed=0)
    with pytest.raises(ValueError, match=esc("pad_id 250 is outside the vocabulary (ids 0 .. 199)")):
        sequences.frame(DataCfg(builtin="sequences", input={"kind": "sequence", "pad_id": 250}))


# --- scoring batches ----------------------------------------------------------------------------------------------

@pytest.fixture
def image_schema(tmp_path) -> dict:
    return prepared(tmp_path / "train", path="digits.csv", builtin="digits", input=IMAGE)


def test_an_image_batch_may_be_columns_or_an_npz(tmp_path, image_schema):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    digits = builtin_frame("digits").iloc[:30]
    X = digits.drop(columns="target").to_numpy()
    np.savez(incoming / "b1.npz", X=X.reshape(-1, 1, 8, 8))  # unlabelled
    np.savez(incoming / "b2.npz", X=X, y=digits["target"].to_numpy())  # flat rows of the image's size, labelled
    digits.to_csv(incoming / "b3.csv", index=False)
    assert [p.name for p in batches.pending(incoming)] == ["b1.npz", "b2.npz", "b3.csv"]
    frames = [batches.validate_batch(tmp_path, p, image_schema, LIMITS) for p in batches.pending(incoming)]
    assert all(list(f[image_schema["features"]].columns) == image_schema["features"] for f in frames)
    assert np.array_equal(frames[0].to_numpy(), frames[2][image_schema["features"]].to_numpy())
    assert "target" not in frames[0] and frames[1]["target"].tolist() == digits["target"].tolist()
    window = batches.window(batches.pending(incoming), image_schema)
    assert window.shape == (90, 65) and window["target"].isna().sum() == 30


@pytest.mark.parametrize(("make", "message"), [
    (lambda X, inc: np.savez(inc / "b.npz", X=X.reshape(-1, 1, 4, 16)),
     "X holds rows of shape [1, 4, 16]; the model takes image rows of shape [1, 8, 8] (64 values)"),
    (lambda X, inc: np.savez(inc / "b.npz", X=X[:, :49].reshape(-1, 1, 7, 7)),
     "X holds rows of shape [1, 7, 7]; the model takes image rows of shape [1, 8, 8]"),
    (lambda X, inc: pd.DataFrame(X[:, :49]).add_prefix("p").to_csv(inc / "b.csv", index=False),
     "rows of 49 values (shape [49]) do not match the model's input: image of shape [1, 8, 8], 64 values per row"),
])
def test_an_image_batch_of_the_wrong_shape_is_quarantined(tmp_path, image_schema, make, message):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    make(builtin_frame("digits").drop(columns="target").to_numpy()[:20], incoming)
    (path,) = batches.pending(incoming)
    with pytest.raises(DataValidationError, match=esc(message)) as err:
        batches.validate_batch(tmp_path, path, image_schema, LIMITS)
    here = LIMITS.model_copy(update={"quarantine_dir": "quarantine"})
    moved, note = batches.quarantine(tmp_path, path, str(err.value), here)
    assert not path.exists() and moved.is_file() and moved.read_bytes()  # nothing lost: the file moved whole
    assert message.split(";")[0] in note.read_text() and batches.pending(incoming) == []


def test_a_sequence_batch_with_unknown_token_ids_is_rejected(tmp_path):
    schema = prepared(tmp_path / "train", path="s.parquet", builtin="sequences", input=SEQ)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    rows = sequences.frame(DataCfg(path="s.parquet", builtin="sequences", input=SEQ, seed=3)).iloc[:50]
    ok = incoming / "ok.npz"
    np.savez(ok, X=rows.drop(columns="target").to_numpy())
    assert len(batches.validate_batch(tmp_path, ok, schema, LIMITS)) == 50
    X = rows.drop(columns="target").to_numpy().copy()
    X[4, 9] = 200
    np.savez(incoming / "oov.npz", X=X)
    with pytest.raises(DataValidationError, match=esc("oov.npz: column 'token_9' row 4 holds 200, which is outside "
                                                      "the model's vocabulary (ids 0 .. 199)")):
        batches.validate_batch(tmp_path, incoming / "oov.npz", schema, LIMITS)
    frame = rows.drop(columns="target").copy()
    frame.loc[frame.index[2], "token_0"] = -1
    frame.to_parquet(incoming / "neg.parquet")
    with pytest.raises(DataValidationError, match="column 'token_0' row 2 holds -1, which is not a token id"):
        batches.validate_batch(tmp_path, incoming / "neg.parquet", schema, LIMITS)
    np.savez(incoming / "short.npz", X=X[:, :16])
    with pytest.raises(DataValidationError, match=esc("rows of shape [16]; the model takes sequence rows of shape "
                                                      "[32]")):
        batches.validate_batch(tmp_path, incoming / "short.npz", schema, LIMITS)


def test_a_tabular_batch_is_checked_as_before(tmp_path):
    schema = {"features": ["a", "b"], "target": "target", "labels": [0, 1]}  # a schema.json from before data.input
    assert spec_of(schema) == InputSpec.tabular(2)
    pd.DataFrame({"a": [1.0], "c": [2.0]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(DataValidationError, match=esc("missing ['b'], unexpected ['c']")):
        batches.validate_batch(tmp_path, tmp_path / "b.csv", schema, LIMITS)


# --- served requests ----------------------------------------------------------------------------------------------

RQ = rq.Limits(max_rows=100, max_body_bytes=1_000_000, max_abs_value=1e9)


def test_served_image_rows_may_be_nested_and_must_have_the_image_shape():
    spec = InputSpec("image", (2, 2, 3), "float32")
    features = npz_columns(spec.shape)
    image = np.arange(12.0).reshape(2, 2, 3)
    body = json.dumps({"rows": [image.tolist(), image.ravel().tolist()]}).encode()
    X = rq.parse_predict(body, features, RQ, spec)
    assert X.shape == (2, 12) and np.array_equal(X[0], image.ravel()) and np.array_equal(X[0], X[1])
    wrong = json.dumps({"rows": [np.zeros((3, 2, 2)).tolist()]}).encode()
    with pytest.raises(rq.BadRequest, match=esc("row 0 has shape [3, 2, 2]; the model takes image rows of shape "
                                                "[2, 2, 3]")) as err:
        rq.parse_predict(wrong, features, RQ, spec)
    assert err.value.status == 422
    ragged = json.dumps({"rows": [[[[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5, 6]]]]}).encode()
    with pytest.raises(rq.BadRequest, match="row 0 has shape ragged"):
        rq.parse_predict(ragged, features, RQ, spec)
    text = json.dumps({"rows": [[[[1, 2, "x"], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]]]}).encode()
    with pytest.raises(rq.BadRequest, match="'pixel_0_0_2': str 'x' is not a number"):
        rq.parse_predict(text, features, RQ, spec)


def test_served_sequence_rows_hold_ids_of_the_vocabulary():
    spec = InputSpec("sequence", (4,), "int64", 10, 0)
    features = sequences.feature_names(4)
    ok = rq.parse_predict(json.dumps({"rows": [[3, 9, 0, 0]]}).encode(), features, RQ, spec)
    assert ok.tolist() == [[3, 9, 0, 0]]
    for row, words in (([3, 10, 0, 0], "column 'token_1' row 1 holds 10, which is outside the model's vocabulary"),
                       ([3, 1.5, 0, 0], "holds 1.5, which is not a token id"), ([3, 1, 0], "has 3 values")):
        with pytest.raises(rq.BadRequest, match=esc(words)) as err:
            rq.parse_predict(json.dumps({"rows": [[1, 2, 3, 4], row]}).encode(), features, RQ, spec)
        assert err.value.status == 422
    by_name = {"rows": [{f: 1 for f in features}]}
    assert rq.parse_predict(json.dumps(by_name).encode(), features, RQ, spec).tolist() == [[1, 1, 1, 1]]
