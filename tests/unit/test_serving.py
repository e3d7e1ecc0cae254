"""The serving endpoint's pure parts: when to load a version, when a traffic segment closes, request ids, what
a request may be, the token check, labels merged into a segment."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ottimo.serving import requests as rq
from ottimo.serving.model import KEEP, LOAD, step
from ottimo.serving.traffic import Segment, UnknownId, _segment_frame, _with_labels, must_close, parse_id, request_id

FEATURES = ["a", "b", "c"]
LIMITS = rq.Limits(max_rows=4, max_body_bytes=2000, max_abs_value=1e9)


@pytest.mark.parametrize("target, serving, refused, force, expected", [
    (None, None, None, False, KEEP),   # no champion yet: nothing to load
    (None, "2", None, False, KEEP),    # alias removed: the current version keeps serving
    ("2", "2", None, False, KEEP),     # already served
    ("3", "2", None, False, LOAD),     # the alias moved
    ("3", None, None, False, LOAD),    # the first champion
    ("3", "2", "3", False, KEEP),      # refused before: not retried at every poll
    ("3", "2", "3", True, LOAD),       # ... but on SIGHUP / POST /reload
    ("4", "2", "3", False, LOAD),      # another version than the refused one
    ("2", "2", "3", True, KEEP),       # back at the served version
])
def test_step_truth_table(target, serving, refused, force, expected):
    assert step(target, serving, refused, force) == expected


SEG = Segment("serve-x", "2", opened=100.0, rows=10)


@pytest.mark.parametrize("seg, version, rows, now, expected", [
    (None, "2", 5, 100.0, False),                       # nothing open
    (SEG, "2", 5, 101.0, False),                        # fits
    (SEG, "3", 5, 101.0, True),                         # another version answers
    (SEG, "2", 11, 101.0, True),                        # would pass segment_rows (20)
    (SEG, "2", 10, 101.0, False),                       # exactly full
    (Segment("serve-x", "2", 100.0, 0), "2", 50, 101.0, False),  # a big first request still goes in
    (SEG, "2", 1, 160.0, True),                         # older than segment_seconds (60)
])
def test_must_close_truth_table(seg, version, rows, now, expected):
    assert must_close(seg, version, rows, now, max_rows=20, max_seconds=60) is expected


def test_request_ids_round_trip_and_foreign_ids_are_refused():
    rid = request_id("serve-20260101T000000-abcdef", 40, 10)
    assert parse_id(rid) == ("serve-20260101T000000-abcdef", 40, 10)
    for bad in ("x", "serve-a.b.c", "../serve-a.0.1", "serve-a/../../etc.0.1", "other-a.0.1", "serve-a.1"):
        with pytest.raises(UnknownId):
            parse_id(bad)


def body(rows) -> bytes:
    return json.dumps({"rows": rows}).encode()


def test_rows_by_name_or_in_order_give_the_same_matrix():
    by_name = rq.parse_predict(body([{"c": 3, "a": 1, "b": 2.5}]), FEATURES, LIMITS)
    in_order = rq.parse_predict(body([[1, 2.5, 3]]), FEATURES, LIMITS)
    assert by_name.dtype == np.float32 and by_name.tolist() == in_order.tolist() == [[1.0, 2.5, 3.0]]


@pytest.mark.parametrize("raw, status, words", [
    (b"{not json", 400, "not JSON"),
    (b"\xff\xfe", 400, "not JSON"),
    (b"[1, 2]", 422, '"rows" list'),
    (b'{"rows": [[1, 2, 3]], "extra": 1}', 422, "unexpected keys ['extra']"),
    (b'{"rows": []}', 422, "non-empty"),
    (b'{"rows": {"a": 1}}', 422, "non-empty list"),
    (body([[1, 2, 3]] * 5), 422, "max_rows = 4"),
    (body([{"a": 1, "b": 2}]), 422, "missing ['c']"),
    (body([{"a": 1, "b": 2, "c": 3, "target": 1}]), 422, "unexpected ['target']"),
    (body([[1, 2]]), 422, "2 values"),
    (body(["1,2,3"]), 422, "row 0 is str"),
    (body([[1, "2", 3]]), 422, "'b': str"),
    (body([[1, None, 3]]), 422, "'b': NoneType"),
    (body([[1, [2], 3]]), 422, "'b': list"),
    (body([[1, 2, False]]), 422, "'c': bool"),
    (b'{"rows": [[1, NaN, 3]]}', 422, "NaN"),
    (b'{"rows": [[1, -Infinity, 3]]}', 422, "-Infinity"),
    (b'{"rows": [[1, 1e999, 3]]}', 422, "not finite"),
    (body([[1, 2, 3], [1, 2e10, 3]]), 422, "row 1, 'b': 2e+10 is beyond"),
    (b" " * 2001, 413, "max_body_bytes = 2,000"),
])
def test_bad_predict_bodies_are_named(raw, status, words):
    with pytest.raises(rq.BadRequest) as err:
        rq.parse_predict(raw, FEATURES, LIMITS)
    assert err.value.status == status and words in str(err.value)


def test_no_bound_when_max_abs_value_is_null():
    assert rq.parse_predict(body([[1, 2e10, 3]]), FEATURES, rq.Limits(4, 2000, None)).shape == (1, 3)


def test_labels_bodies():
    assert rq.parse_labels(b'{"id": "serve-a.0.2", "labels": [1, 0]}', [0, 1], LIMITS) == ("serve-a.0.2", [1, 0])
    for raw in (b'{"id": 3, "labels": [1]}', b'{"id": "x", "labels": [2]}', b'{"id": "x", "labels": []}',
                b'{"id": "x", "labels": [true]}', b'{"id": "x", "labels": [0.5]}', b'{"id": "x"}'):
        with pytest.raises(rq.BadRequest) as err:
            rq.parse_labels(raw, [0, 1], LIMITS)
        assert err.value.status == 422


@pytest.mark.parametrize("header, token, ok", [
    (None, None, True), ("Bearer anything", None, True),  # auth off by default
    (None, "s3cret", False), ("", "s3cret", False), ("Bearer wrong", "s3cret", False),
    ("Basic s3cret", "s3cret", False), ("Bearer s3cret", "s3cret", True), ("bearer s3cret", "s3cret", True),
])
def test_authorized_truth_table(header, token, ok):
    assert rq.authorized(header, token) is ok


def test_softmax_rows_sum_to_one_and_keep_the_argmax():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.1, 0.3, 0.2]])
    p = rq.softmax(logits)
    assert np.allclose(p.sum(axis=1), 1) and p.argmax(axis=1).tolist() == [0, 1] and np.isfinite(p).all()


def test_a_segment_file_holds_rows_predictions_and_labels(tmp_path):
    jsonl = tmp_path / "serve-a.jsonl"
    lines = [{"rows": {"id": "serve-a.0.2", "version": "3", "at": "t", "features": FEATURES,
                       "X": [[1, 2, 3], [4, 5, 6]], "pred": [7, 8]}},
             {"rows": {"id": "serve-a.2.1", "version": "3", "at": "t", "features": FEATURES, "X": [[0, 0, 0]],
                       "pred": [9]}},
             {"label": {"id": "serve-a.0.2", "labels": [7, 1]}}]
    jsonl.write_text("\n".join(map(json.dumps, lines)) + "\n{\"rows\": {torn")  # a crash mid-line
    df = _segment_frame(jsonl, "target")
    assert df["request_id"].tolist() == ["serve-a.0.2", "serve-a.0.2", "serve-a.2.1"]
    assert df[FEATURES].to_numpy().tolist() == [[1, 2, 3], [4, 5, 6], [0, 0, 0]]
    assert df["prediction"].tolist() == [7, 8, 9] and set(df["model_version"]) == {"3"}
    assert df["target"].tolist()[:2] == [7, 1] and pd.isna(df["target"].iloc[2])
    later = _with_labels(df, {"serve-a.2.1": [4], "serve-a.0.2": [1]}, "target")  # wrong count: ignored
    assert later["target"].tolist() == [7, 1, 4] and str(later["target"].dtype) == "Int64"


def _served(version: str, sha: str):
    from ottimo.serving.model import Served

    return Served("m", version, sha, "rev", FEATURES, [0, 1], None, "t", 0.1)


@pytest.mark.parametrize("spare, version, sha, ok", [
    (None, "1", "aa", False),
    (("1", "aa"), "1", "aa", True),    # a rollback to the version swapped out: no download
    (("1", "aa"), "2", "aa", False),   # another version
    (("1", "aa"), "1", "bb", False),   # its sha256 tag changed: fetched and verified again
    (("1", "aa"), "1", None, False),   # no tag any more: fetched again (and refused)
])
def test_reusable_truth_table(spare, version, sha, ok):
    from ottimo.serving.model import reusable

    assert reusable(_served(*spare) if spare else None, version, sha) is ok
