"""The model-family contract: builders by import path, recipes, the built-in families through the same contract,
structured pruning of any family (or a reason why not), and no family named outside its own module."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn

from ottimo.compress import techniques
from ottimo.config import BUILTIN_FAMILIES, parse_params
from ottimo.models.family import FamilyError, Recipe, build, count_parameters, load_builder, recipe
from ottimo.spec import InputSpec
from tests.conftest import REPO

TABULAR, IMAGE = InputSpec.tabular(64), InputSpec("image", (1, 8, 8), "float32")
SEQUENCE = InputSpec("sequence", (16,), "int64", vocab_size=50, pad_id=0)


def builtin(name: str, **hparams) -> Recipe:
    return Recipe(name, BUILTIN_FAMILIES[name]["builder"], hparams)


def example(spec: InputSpec, n: int = 4) -> torch.Tensor:
    return torch.ones(n, *spec.shape, dtype=getattr(torch, spec.dtype))


@pytest.mark.parametrize(("name", "spec"), [("mlp", TABULAR), ("mlp", IMAGE), ("cnn", IMAGE),
                                            ("transformer", TABULAR), ("transformer", SEQUENCE)])
def test_builtin_families_build_for_the_inputs_they_take(name, spec):
    model = build(builtin(name), spec, 3)
    assert model(example(spec)).shape == (4, 3)


@pytest.mark.parametrize(("name", "spec", "words"), [("cnn", TABULAR, "the cnn takes images"),
                                                     ("mlp", SEQUENCE, "use the transformer")])
def test_a_family_refuses_rows_it_cannot_take_and_says_what_to_do(name, spec, words):
    with pytest.raises(FamilyError, match=f"family '{name}'.*{spec.kind}.*{words}"):
        build(builtin(name), spec, 3)


def test_builder_errors_name_the_path_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FamilyError, match="module 'nomodels' not found; put nomodels/net.py in the project folder"):
        load_builder("nomodels.net:build")
    (tmp_path / "somenet.py").write_text("def make(spec, n):\n    return 'not a module'\nvalue = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FamilyError, match="has no 'build'"):
        load_builder("somenet:build")
    with pytest.raises(FamilyError, match="is not a function"):
        load_builder("somenet:value")
    with pytest.raises(FamilyError, match="returned str, not a torch.nn.Module"):
        build(Recipe("x", "somenet:make"), TABULAR, 3)
    with pytest.raises(FamilyError, match="unexpected keyword argument 'width'"):
        build(Recipe("x", "somenet:make", {"width": 3}), TABULAR, 3)
    sys.modules.pop("somenet", None)


def test_a_recipe_lays_tuned_values_over_the_family_over_train():
    params = parse_params({"train": {"lr": 0.1, "batch_size": 16}, "families": {"mlp": {
        "train": {"lr": 0.02}, "hparams": {"dropout": 0.3}}}})
    r = recipe(params.families, params.train, "mlp")
    assert (r.lr, r.batch_size, r.hparams) == (0.02, 16, {"hidden": [128, 64], "dropout": 0.3})
    tuned = recipe(params.families, params.train, "mlp", {"train": {"lr": 0.005}, "hparams": {"hidden": [8]}})
    assert (tuned.lr, tuned.hparams) == (0.005, {"hidden": [8], "dropout": 0.3})
    assert Recipe.from_json(tuned.to_json()) == tuned


@pytest.mark.parametrize(("name", "spec"), [("mlp", TABULAR), ("cnn", IMAGE), ("transformer", SEQUENCE)])
def test_structured_pruning_of_any_family_removes_parameters_and_keeps_the_classes(name, spec):
    model = build(builtin(name), spec, 3).eval()
    small = techniques.structured_prune(model, spec, 3, 0.5)
    assert count_parameters(small) < 0.85 * count_parameters(model)
    assert small(example(spec)).shape == (4, 3) and techniques.sparsity(small) == 0.0


def test_a_model_without_anything_to_remove_is_not_prunable_with_the_reason():
    head_only = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(techniques.NotPrunable, match="no channel or neuron can be removed"):
        techniques.structured_prune(head_only, TABULAR, 3, 0.5)


def test_unstructured_pruning_reaches_convolutions():
    model = build(builtin("cnn"), IMAGE, 3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all((m, "weight") in techniques.prunable(model) for m in convs)
    techniques.make_permanent(techniques.magnitude_prune(model, 0.5))
    assert techniques.sparsity(model) == pytest.approx(0.5, abs=0.01)


def test_no_family_is_named_outside_its_own_module():
    """The built-ins go through the contract like a user's family: no `if family == "mlp"` anywhere."""
    named = re.compile(r"""["'](mlp|cnn|transformer)["']""")
    allowed = {"ottimo/config.py"}  # BUILTIN_FAMILIES registers them, and the defaults name them
    files = [p for folder in ("ottimo", "tasks", "flows") for p in (REPO / folder).rglob("*.py")]
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files if str(p.relative_to(REPO)) not in allowed
            and "builtin" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if named.search(line)]
    assert not hits, hits
