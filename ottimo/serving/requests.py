"""What a request may be, as pure functions: the JSON body of POST /predict and /labels turned into arrays, or a
BadRequest that names the problem and the HTTP status it gets. Nothing here touches the model or the disk.

A predict body is `{"rows": [...]}` with at most `max_rows` rows, each either an object with exactly the
training features as keys or a list of numbers in the features' order; numbers only (no text, no booleans),
finite, within ±limits.max_abs_value, the same checks as a scored batch. For an image model a row may also be a
nested list of the image's shape ([C][H][W], flattened row-major); a sequence model's token ids must lie in its
vocabulary (`input_rows`, `check_tokens`).
"""

from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass

import numpy as np

from ottimo.data.inputs import check_rows
from ottimo.data.labels import parse, shown
from ottimo.data.tables import DataValidationError, check_columns
from ottimo.spec import InputSpec


class BadRequest(ValueError):
    """A request the server refuses; `status` is its HTTP code (4xx), the message says what to change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_rows: int
    max_body_bytes: int
    max_abs_value: float | None  # limits.max_abs_value: the same bound as batches


def _no_constants(name: str):
    raise BadRequest(422, f"{name} is not a number JSON allows; send finite numbers (no NaN or Infinity)")


def parse_json(body: bytes, limits: Limits) -> object:
    """The decoded body, or BadRequest: 413 above max_body_bytes, 400 when it is not UTF-8 JSON."""
    if len(body) > limits.max_body_bytes:
        raise BadRequest(413, f"body of {len(body):,} bytes is above deploy.serve.max_body_bytes = "
                              f"{limits.max_body_bytes:,}; send fewer rows per request")
    try:
        return json.loads(body, parse_constant=_no_constants)
    except BadRequest:
        raise
    except (UnicodeDecodeError, ValueError) as err:
        raise BadRequest(400, f"body is not JSON ({err}); send {{\"rows\": [{{feature: number, ...}}, ...]}} "
                              "with Content-Type: application/json") from None


def rows_of(doc: object, limits: Limits) -> list:
    """The `rows` list of a predict body: present, a non-empty list, at most max_rows long."""
    if not isinstance(doc, dict) or "rows" not in doc:
        raise BadRequest(422, "body must be a JSON object with a \"rows\" list, e.g. {\"rows\": [{...}, {...}]}")
    extra = sorted(set(doc) - {"rows"})
    if extra:
        raise BadRequest(422, f"unexpected keys {extra[:5]} in the body; only \"rows\" is read")
    rows = doc["rows"]
    if not isinstance(rows, list) or not rows:
        raise BadRequest(422, "\"rows\" must be a non-empty list of rows")
    if len(rows) > limits.max_rows:
        raise BadRequest(422, f"{len(rows):,} rows is above deploy.serve.max_rows = {limits.max_rows:,}; "
                              "split them over several requests")
    return rows


def _ordered(i: int, row: object, features: list[str], names: frozenset[str]) -> list:
    """One row as a list in the features' order (an object by its keys, a list as it is)."""
    if isinstance(row, dict):
        if row.keys() != names:
            try:
                check_columns(f"row {i}", list(row), features, None)
            except DataValidationError as err:
                raise BadRequest(422, str(err)) from None
        return [row[f] for f in features]
    if isinstance(row, list):
        if len(row) != len(features):
            raise BadRequest(422, f"row {i} has {len(row)} values; the model takes {len(features)} "
                                  f"(the features {features[:3]}... in order), or send an object by feature name")
        return row
    raise BadRequest(422, f"row {i} is {type(row).__name__}; a row is an object by feature name or a list of "
                          f"{len(features)} numbers")


def _check_value(i: int, feature: str, v: object, bound: float | None) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadRequest(422, f"row {i}, {feature!r}: {type(v).__name__} {str(v)[:40]!r} is not a number")
    if not math.isfinite(v):
        raise BadRequest(422, f"row {i}, {feature!r}: {v} is not finite; send finite numbers")
    if bound is not None and abs(v) > bound:
        raise BadRequest(422, f"row {i}, {feature!r}: {v:g} is beyond ±{bound:g} (limits.max_abs_value), "
                              "the bound every batch is checked against")


def features_matrix(rows: list, features: list[str], limits: Limits) -> np.ndarray:
    """rows → float32 [n, len(features)], every value checked; BadRequest (422) names the first bad cell."""
    names = frozenset(features)
    out = [_ordered(i, row, features, names) for i, row in enumerate(rows)]
    for i, row in enumerate(out):
        for feature, v in zip(features, row, strict=True):
            _check_value(i, feature, v, limits.max_abs_value)
    return np.asarray(out, dtype=np.float32)


def _nested_shape(x: object) -> tuple[int, ...] | None:
    """The shape of a regular nested list (() for a scalar), None when ragged."""
    if not isinstance(x, list):
        return ()
    inner = {_nested_shape(v) for v in x}
    if len(inner) > 1 or None in inner:
        return None
    return (len(x), *(inner.pop() if inner else ()))


def _flatten(x: object) -> list:
    return [v for part in x for v in _flatten(part)] if isinstance(x, list) else [x]


def input_rows(rows: list, spec: InputSpec | None) -> list:
    """Rows with nested lists (an image as [C][H][W]) flattened row-major, when the model's rows have more than one
    axis; a nested row of another shape is refused (422), naming the expected and the found shape."""
    if spec is None or len(spec.shape) < 2:
        return rows
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, list) and any(isinstance(v, list) for v in row):
            found = _nested_shape(row)
            if found != spec.shape:
                raise BadRequest(422, f"row {i} has shape {list(found) if found else 'ragged'}; the model takes "
                                      f"{spec.kind} rows of shape {list(spec.shape)} (nested lists), or a flat list "
                                      f"of {spec.size} values, or an object by feature name")
            row = _flatten(row)
        out.append(row)
    return out


def check_tokens(X: np.ndarray, features: list[str], spec: InputSpec | None) -> np.ndarray:
    """A sequence model's rows hold token ids of its vocabulary; BadRequest (422) names the first that is not."""
    if spec is not None:
        try:
            check_rows(X, features, spec, "request")
        except DataValidationError as err:
            raise BadRequest(422, str(err)) from None
    return X


def parse_predict(body: bytes, features: list[str], limits: Limits, spec: InputSpec | None = None) -> np.ndarray:
    """A predict body → the feature matrix, or BadRequest; `spec`: the model's rows (images may come nested,
    sequences must hold ids of its vocabulary)."""
    rows = input_rows(rows_of(parse_json(body, limits), limits), spec)
    return check_tokens(features_matrix(rows, features, limits), features, spec)


def parse_labels(body: bytes, labels: list, limits: Limits) -> tuple[str, list]:
    """A labels body `{"id": "<id of a predict answer>", "labels": [one class label per row]}` → (id, labels), each
    one of the training classes `labels` (integers or text, as /predict answers them); an unknown label is a 422
    naming it, its position and the classes, never a new class."""
    doc = parse_json(body, limits)
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not isinstance(doc.get("labels"), list):
        raise BadRequest(422, "body must be {\"id\": \"<the id a /predict answer gave>\", \"labels\": [label, ...]}")
    if not doc["labels"]:
        raise BadRequest(422, f"labels must be a non-empty list, one of the training classes {shown(labels)} per row")
    try:
        return doc["id"], parse(doc["labels"], labels)
    except ValueError as err:
        raise BadRequest(422, f"{err}; nothing was recorded") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def authorized(header: str | None, token: str | None) -> bool:
    """No token configured: everyone; else exactly `Bearer <token>` (compared in constant time)."""
    if not token:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
