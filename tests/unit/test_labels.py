"""Class labels as integers or text (ottimo.data.labels) and the own-data checks around them: the label rules'
truth table, the class list fixed by prepare, an index column, text among numbers, labels in the ONNX file,
served and late labels, and the metric names a text class becomes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ottimo.config import ConfigError, DataCfg, LimitsCfg, parse_params
from ottimo.data import batches
from ottimo.data import labels as lbl
from ottimo.data.intake import DataValidationError
from ottimo.data.tables import builtin_frame, index_column, load_splits, prepare, validate_frame

SRC = "x.csv"


def frame(target: list, n_features: int = 2) -> pd.DataFrame:
    df = pd.DataFrame({f"f{i}": np.arange(len(target), dtype=float) + i for i in range(n_features)})
    return df.assign(target=pd.Series(target, dtype=object if any(isinstance(v, str) for v in target) else None))


@pytest.mark.parametrize(("values", "expected", "dtype"), [
    ([2, 0, 1], [2, 0, 1], "int64"),
    ([2.0, 0.0, 1.0], [2, 0, 1], "int64"),  # a CSV column with 3.0: integer labels
    (["dog", "cat", "bird"], ["dog", "cat", "bird"], "object"),
    (pd.Categorical(["b", "a", "b"]), ["b", "a", "b"], "object"),
    ([True, False, True], ["True", "False", "True"], "object"),  # booleans: two text classes
])
def test_clean_labels(values, expected, dtype):
    out = lbl.clean(pd.Series(values), "target", SRC)
    assert out.tolist() == expected and str(out.dtype) == dtype


@pytest.mark.parametrize(("values", "words"), [
    ([0, 1, np.nan, 2, np.nan], ["no label at rows [2, 4]", "(2 row(s))"]),
    (["cat", "", "dog", "  "], ["no label at rows [1, 3]"]),
    ([0, 1, 3.5, 2], ["fractions [3.5] at rows [2]", "continuous target"]),
    ([0, 1, np.inf], ["fractions [inf] at rows [2]"]),
    ([0, 1, 2, "seven", 4], ["mixes numbers and text", "text ['seven'] at rows [3]", "such as [0, 1, 2]"]),
    (["cat", "dog", 3, "cat", "dog"], ["numbers [3] at rows [2]", "among text such as ['cat', 'dog']"]),
    (["7", "8", "seven"], ["text ['seven'] at rows [2]", "such as [7, 8]"]),  # numbers written as text count too
])
def test_bad_labels_are_named(values, words):
    with pytest.raises(DataValidationError) as err:
        lbl.clean(pd.Series(values, dtype=object), "target", SRC)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_unknown_labels_name_labels_rows_and_classes():
    with pytest.raises(DataValidationError) as err:
        lbl.check_known(pd.Series(["cat", "wolf", "dog", "fox", "wolf"]), "target", SRC, ["bird", "cat", "dog"], "!")
    assert str(err.value) == ("x.csv: target 'target' holds unknown label(s) ['wolf', 'fox'] at rows [1, 3, 4] (3 "
                              "row(s)); the known classes are ['bird', 'cat', 'dog']!")
    lbl.check_known(pd.Series([0, 2]), "target", SRC, [0, 1, 2])  # known: nothing raised
    with pytest.raises(DataValidationError, match=r"unknown label\(s\) \['0'\]"):  # text "0" is not the class 0
        lbl.check_known(pd.Series(["0"]), "target", SRC, [0, 1])


def test_class_list_indices_and_json_labels():
    assert lbl.classes(pd.Series(["dog", "bird", "cat", "dog"])) == ["bird", "cat", "dog"]
    assert lbl.classes(pd.Series(np.array([3, 1, 3]))) == [1, 3] and type(lbl.classes(pd.Series([3, 1]))[0]) is int
    assert lbl.classes(pd.Series(["a"]), ["z", "b"]) == ["b", "z"]  # data.labels decide, sorted
    assert lbl.indices(pd.Series(["dog", "bird"]), ["bird", "cat", "dog"]).tolist() == [2, 0]
    assert lbl.indices(np.array([3, 1]), [1, 3]).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"\['fox'\] are not among the classes"):
        lbl.indices(pd.Series(["fox"]), ["bird"])
    assert lbl.parse(["cat", "dog"], ["cat", "dog"]) == ["cat", "dog"]
    assert lbl.parse([1, 2.0], [0, 1, 2]) == [1, 2]
    for bad, known, where in ((["cat", "wolf"], ["cat", "dog"], "['wolf'] at positions [1]"),
                              ([1], ["cat", "dog"], "[1] at positions [0]"),  # an integer is not a text class
                              ([True], [0, 1], "[True] at positions [0]"),  # true is not 1
                              ([0, 0.5], [0, 1], "[0.5] at positions [1]")):
        with pytest.raises(ValueError) as err:
            lbl.parse(bad, known)
        assert where in str(err.value) and f"known classes are {known}" in str(err.value)
    assert lbl.shown(list(range(25)), 3) == "[0, 1, 2] and 22 more"


@pytest.mark.parametrize(("labels", "ok"), [
    ([0, 1, 2], True), (["cat", "dog"], True), (None, True),
    ([True, False], False), (["1", "2"], False), (["cat", "cat"], False), ([1, "cat"], False), (["cat", " "], False),
    ([1.5], False), ([], False), (["cat"], False),
])
def test_data_labels_take_integers_or_text(labels, ok):
    raw = {"data": {"labels": labels}}
    if ok:
        assert parse_params(raw).data.labels == labels
    else:
        with pytest.raises(ConfigError, match="data.labels"):
            parse_params(raw)


def test_prepare_fixes_the_sorted_text_classes(tmp_path):
    df = frame(["dog", "cat", "bird"] * 40)
    df.to_csv(tmp_path / "raw.csv", index=False)
    cfg = DataCfg(path="raw.csv", builtin=None)
    prepare(tmp_path, cfg, tmp_path / "prepared")
    schema = json.loads((tmp_path / "prepared" / "schema.json").read_text())
    assert schema["labels"] == ["bird", "cat", "dog"] == lbl.of_prepared(tmp_path / "prepared")
    splits = load_splits(tmp_path / "prepared")
    test = pd.read_parquet(tmp_path / "prepared" / "test.parquet")
    assert np.array(splits.labels)[splits.y_test].tolist() == test["target"].tolist()
    assert json.loads(lbl.tag_of(tmp_path / "prepared")) == ["bird", "cat", "dog"]
    # data.labels pins the classes: a label outside them is refused, with the rows and the classes
    pinned = cfg.model_copy(update={"labels": ["bird", "cat"]})
    with pytest.raises(DataValidationError, match=r"\['dog'\] at rows \[0, 3, 6, 9, 12\] \(40 row\(s\)\); the known "
                                                  r"classes are \['bird', 'cat'\]. Fix the label, or list every class"):
        validate_frame(df, pinned, Path(SRC))


def test_a_written_index_column_is_never_a_feature(tmp_path):
    digits = builtin_frame("digits")
    digits.to_csv(tmp_path / "with-index.csv")  # pandas' default: index=True
    df = pd.read_csv(tmp_path / "with-index.csv")
    assert df.columns[0] == "Unnamed: 0"
    with pytest.raises(DataValidationError) as err:
        validate_frame(df, DataCfg(), Path(SRC))
    msg = str(err.value)
    assert "first column has no name" in msg and "holds 0..1796" in msg and "index=False" in msg
    assert "data.index_column: drop" in msg and "data.features" not in msg
    out = validate_frame(df, DataCfg(index_column="drop"), Path(SRC))
    assert "Unnamed: 0" not in out.columns and out.shape == (1797, 65)
    own = digits.sample(frac=1, random_state=0)  # a shuffled frame: its index is not 0..n-1, still no feature
    own.to_csv(tmp_path / "own.csv")
    with pytest.raises(DataValidationError, match="first column has no name") as err:
        validate_frame(pd.read_csv(tmp_path / "own.csv"), DataCfg(builtin=None), Path(SRC))
    assert "holds 0.." not in str(err.value)
    middle = pd.DataFrame({"a": [1.0], "Unnamed: 1": [2.0], "b": [3.0]})
    for policy in ("refuse", "drop"):
        with pytest.raises(DataValidationError, match=r"column\(s\) \[2\] \(counting from 1\) have no name"):
            index_column(middle, SRC, policy)


def test_batches_get_the_same_index_treatment(tmp_path):
    digits = builtin_frame("digits")
    schema = {"features": [c for c in digits.columns if c != "target"], "target": "target", "labels": list(range(10))}
    batch = tmp_path / "incoming" / "b.csv"
    batch.parent.mkdir()
    digits.head(30).drop(columns=["target"]).to_csv(batch)
    with pytest.raises(DataValidationError, match="first column has no name.*index=False"):
        batches.validate_batch(tmp_path, batch, schema, LimitsCfg())
    assert len(batches.validate_batch(tmp_path, batch, schema, LimitsCfg(), "drop")) == 30


def test_text_among_numbers_names_column_values_and_rows():
    digits = builtin_frame("digits")
    digits["pixel_2_5"] = digits["pixel_2_5"].astype(object)
    digits.loc[[8, 15], "pixel_2_5"] = "unknown"
    digits.loc[21, "pixel_2_5"] = "?"
    digits["pixel_6_6"] = digits["pixel_6_6"].astype(object)
    digits.loc[3, "pixel_6_6"] = "n/a"  # not read as missing here: it came as text (a Parquet string column)
    with pytest.raises(DataValidationError) as err:
        validate_frame(digits, DataCfg(), Path(SRC))
    msg = str(err.value)
    assert "2 feature column(s) hold text where numbers belong" in msg
    assert "column 'pixel_2_5': ['unknown', '?'] at rows [8, 15, 21] (3 cell(s))" in msg
    assert "column 'pixel_6_6': ['n/a'] at rows [3]" in msg and "TypeError" not in msg and "ufunc" not in msg


def test_onnx_files_carry_their_classes(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from ottimo.onnx.export import sha256
    from ottimo.onnx.measure import session
    from ottimo.onnx.metadata import read_classes, write_classes

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert read_classes(path) is None
    before = sha256(path)
    write_classes(path, [0, 1, 2])
    write_classes(path, ["bird", "cat", "é"])  # replaced, not added twice
    assert read_classes(path) == ["bird", "cat", "é"] and sha256(path) != before
    assert [p.key for p in onnx.load(str(path)).metadata_props] == ["ottimo.classes"]
    assert session(path).run(None, {"x": np.ones((1, 3), np.float32)})[0].shape == (1, 3)  # still runs


def test_served_classes_must_match_the_schema_and_labels_parse_as_text():
    from ottimo.serving import requests as rq
    from ottimo.serving.model import check_classes
    from ottimo.serving.traffic import _with_labels

    check_classes(None, ["a", "b"])  # an older file without classes: the schema decides
    check_classes(["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="would answer with the wrong labels"):
        check_classes(["b", "a"], ["a", "b"])
    limits = rq.Limits(10, 10_000, 1e9)
    assert rq.parse_labels(b'{"id": "r", "labels": ["cat", "dog"]}', ["cat", "dog"], limits) == ("r", ["cat", "dog"])
    with pytest.raises(rq.BadRequest) as err:
        rq.parse_labels(b'{"id": "r", "labels": ["cat", "wolf"]}', ["cat", "dog"], limits)
    msg = str(err.value)
    assert err.value.status == 422 and "['wolf'] at positions [1]" in msg and "classes are ['cat', 'dog']" in msg
    df = pd.DataFrame({"request_id": ["r", "r", "s"], "f": [1.0, 2.0, 3.0]})
    out = _with_labels(df, {"r": ["cat", "dog"]}, "target")
    assert out["target"].tolist()[:2] == ["cat", "dog"] and pd.isna(out["target"].iloc[2])
    assert _with_labels(out, {"s": ["bird"]}, "target")["target"].tolist() == ["cat", "dog", "bird"]


def test_monitoring_compares_text_labels_and_names_metrics_safely():
    from ottimo.monitor import drift, ledger

    assert drift.realized(np.array(["cat", "dog", "cat"]), np.array([0, 1, 2, 7]),
                          np.array(["cat", "cat", "cat", "dog"], dtype=object)) == (2, 3)
    assert drift.realized(np.array([1, 2]), np.array([0, 1]), np.array([1.0, 3.0])) == (1, 2)
    assert drift.realized(np.array([1, 2]), np.array([0]), np.array(["wolf"], dtype=object)) == (0, 1)
    figures = ledger.scored_figures(["n/a (?)", "cat", "cat"], ["cat", "cat", None])
    assert figures["predicted.n_a ___"] == pytest.approx(1 / 3) and figures["predicted.cat"] == pytest.approx(2 / 3)
    assert figures["labelled_rows"] == 2 and figures["accuracy"] == 0.5
