"""params.transformer.yaml, the profile bench/compression.py --profile transformer runs: it loads, and it describes
a transformer of at least 1M parameters on the `sequences` builtin, compressed as issue 15 measures it. No data is
generated and nothing is trained."""

from __future__ import annotations

import pytest

from ottimo.config import load_params
from ottimo.data.inputs import input_of
from ottimo.models.family import build, count_parameters, recipe
from ottimo.spec import DTYPES, InputSpec
from tests.conftest import REPO

PROFILE = REPO / "params.transformer.yaml"


@pytest.fixture(scope="module")
def params():
    return load_params(PROFILE)


def test_the_profile_is_the_sequences_builtin_with_a_real_vocabulary(params):
    data = params.data
    assert data.builtin == "sequences" and data.input.kind == "sequence"
    length, vocab = input_of(data).shape[0], input_of(data).vocab_size
    assert length in (64, 128) and vocab >= 2048
    assert data.sequences.rows >= 2000


def test_its_teacher_is_a_transformer_of_at_least_a_million_parameters(params):
    assert params.train.candidates == ["transformer"] and params.compress.teacher == "transformer"
    cfg = input_of(params.data)
    spec = InputSpec("sequence", tuple(cfg.shape), DTYPES["sequence"], cfg.vocab_size, cfg.pad_id)
    model = build(recipe(params.families, params.train, "transformer"), spec, params.data.sequences.classes)
    assert count_parameters(model) >= 1_000_000


def test_it_compresses_as_issue_15_measures(params):
    c = params.compress
    assert c.enabled and c.fuse and c.bases == ["teacher"] and not c.distill.enabled
    assert not c.prune.unstructured and not c.prune.structured
    assert {"int8-dyn", "int8-dyn-pc", "int8-qdq-minmax", "int8-qdq-entropy"} <= set(c.quantize.options)
    assert c.quantize.accuracy_aware and c.select.max_drop_vs_teacher <= 0.5
    assert not params.tune.enabled
    ev = params.evaluate
    assert ev.target == "edge" and ev.targets["edge"].threads == 1 and ev.targets["edge"].batch == 1
    assert ev.targets["server"].threads == 2 and ev.targets["server"].batch == 64
