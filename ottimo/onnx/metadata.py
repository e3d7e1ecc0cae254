"""The class list inside an ONNX file: metadata_props key `ottimo.classes`, JSON (e.g. ["bird", "cat", "dog"] or
[0, 1, 2]), so the file alone says what its output i means. Written before the file is logged and hashed
(ottimo.registry.logged_model), so the registered sha256 covers it."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

CLASSES = "ottimo.classes"


def write_classes(path: Path, classes: list) -> Path:
    """Set (or replace) the class list in the file's metadata, rewriting the file in place (self-contained)."""
    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key != CLASSES]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=CLASSES, value=json.dumps(list(classes), ensure_ascii=False))
    onnx.save_model(model, str(path))
    return path


def read_classes(path: Path) -> list | None:
    """The class list the file carries, or None (a file logged before classes were recorded)."""
    model = onnx.load(str(path), load_external_data=False)
    found = [p.value for p in model.metadata_props if p.key == CLASSES]
    return json.loads(found[-1]) if found else None
