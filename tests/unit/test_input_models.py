"""Models on images and token sequences: the `sequences` builtin is learnt by a small transformer and not by an
mlp reading raw ids; the model card perturbs each input kind its own way (image shifts and rotations, token dropout
and substitution) and takes the image shape from data.input."""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ottimo.card.sections import (
    FIGURES,
    INPUT_KINDS,
    draw_input,
    generalisation_section,
    image_shape,
    interpretability_section,
    measure_card,
    perturb_input,
    robustness_section,
)
from ottimo.config import CardCfg, DataCfg, EvaluateCfg, TrainCfg, parse_params
from ottimo.data.tables import Splits, load_splits, materialise_raw, prepare
from ottimo.models.family import recipe
from ottimo.models.train import fit
from ottimo.onnx.export import export_onnx
from ottimo.onnx.measure import accuracy, session
from ottimo.spec import InputSpec

TRAIN = TrainCfg(max_epochs=8, patience=3)
FAMILIES = parse_params({"families": {
    "transformer": {"hparams": {"d_model": 16, "heads": 2, "layers": 1, "ff_dim": 32}},
    "cnn": {"hparams": {"channels": [8, 16], "hidden": 32}}, "mlp": {"hparams": {"hidden": [64]}}}}).families
CARD = CardCfg(drift_severities=[0.1], importance_rows=100, importance_repeats=1, batch_sizes=[1, 8],
               seconds_per_batch_size=0.02)
EVAL = EvaluateCfg(warmup=2, runs=10)


def prepared(root: Path, **data) -> Splits:
    cfg = DataCfg(**data)
    materialise_raw(root, cfg)
    prepare(root, cfg, root / "prepared")
    return load_splits(root / "prepared")


def held_out(model: torch.nn.Module, splits: Splits) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(splits.rows(splits.X_test))).argmax(1).numpy() == splits.y_test).mean())


def trained(root: Path, family: str, splits: Splits) -> tuple[torch.nn.Module, Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and steady on a shared machine
    try:
        model = fit(recipe(FAMILIES, TRAIN, family), splits, TRAIN, seed=0).model
    finally:
        torch.set_num_threads(threads)
    return model, export_onnx(model, splits.input, root / f"{family}.onnx")


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequences")
    splits = prepared(root, path="seq.parquet", builtin="sequences", input={"kind": "sequence"})
    return splits, *trained(root, "transformer", splits)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    splits = prepared(root, path="digits.npz", builtin="digits", input={"kind": "image", "shape": [1, 8, 8]})
    return splits, *trained(root, "cnn", splits)


def test_a_small_transformer_learns_the_sequences_builtin_and_an_mlp_on_raw_ids_does_not(seq):
    splits, model, _ = seq
    assert splits.input == InputSpec("sequence", (32,), "int64", 200, 0)
    acc = held_out(model, splits)
    assert acc >= 0.9, f"transformer reached only {acc:.3f}"
    raw = replace(splits, spec=None)  # the same columns as numbers: a flat table
    mlp = fit(recipe(FAMILIES, TRAIN, "mlp"), raw, TRAIN, seed=0).model
    assert held_out(mlp, raw) < 0.5  # four balanced classes: chance is 0.25


def test_card_perturbs_token_sequences_by_dropout_and_substitution(seq):
    splits, _, path = seq
    sess = session(path)
    rob = robustness_section(sess, splits.X_test, splits.y_test, splits.X_train, CARD, splits.spec)
    assert set(rob["curves"]) == {"dropout", "substitute"} == set(rob["method"])
    clean = accuracy(sess, splits.X_test, splits.y_test)
    for curve in rob["curves"].values():
        assert curve[0] == clean and curve[-1] < clean - 0.2, curve  # 80% of the tokens gone or replaced
        assert all(b <= a + 0.02 for a, b in zip(curve, curve[1:], strict=False)), curve
    assert rob == robustness_section(sess, splits.X_test, splits.y_test, splits.X_train, CARD, splits.spec)
    gen = generalisation_section(sess, splits, CARD)  # the simulator's numeric shifts do not apply to token ids
    assert gen["drift_curves"] == {} and gen["drift_accuracy"] is None and gen["drift_skipped"] == CARD.drift_kinds
    assert interpretability_section(sess, splits.X_test, splits.y_test, splits.features, CARD,
                                    splits.spec)["image_shape"] is None


def test_card_perturbs_images_by_shifts_and_rotations_with_the_shape_of_data_input(image, tmp_path):
    splits, model, path = image
    assert held_out(model, splits) >= 0.85
    assert CARD.image_shape is None and image_shape(CARD, splits.spec, 64) == [8, 8]
    card = measure_card(path, splits, CARD, EVAL, 50.0, tmp_path / "card")
    rob = card.robustness
    assert set(rob["curves"]) == {"shift", "rotate"} and rob["curves"]["shift"][0] == card.accuracy["accuracy"]
    assert all(c[-1] < c[0] - 0.3 for c in rob["curves"].values()), rob["curves"]  # 3.2 pixels, 72 degrees
    gen = card.generalisation  # rotate and blur run: the image comes from data.input, not card.image_shape
    assert set(gen["drift_curves"]) == set(CARD.drift_kinds) and gen["drift_skipped"] == []
    assert card.interpretability["image_shape"] == [8, 8] and "importance.png" in card.plots
    figures = card.figures()
    ours = {f"robustness.{k}" for k in INPUT_KINDS["image"]}
    others = {f for f in FIGURES if f.startswith("robustness.")} - ours
    assert all(math.isfinite(figures[f]) for f in ours) and all(math.isnan(figures[f]) for f in others)


def test_image_and_token_perturbations_do_what_they_say():
    spec = InputSpec("image", (1, 5, 5), "float32")
    dot = np.zeros((1, 25), dtype=np.float32)
    dot[0, 2 * 5 + 4] = 1.0  # middle row, right edge
    turn = perturb_input(dot, "rotate", 1.0, np.array([1.0]), spec).reshape(5, 5)
    assert turn.argmax() in (0 * 5 + 2, 4 * 5 + 2)  # a quarter turn takes it to the top or bottom edge
    left = perturb_input(dot, "shift", 0.8, np.array([np.pi]), spec).reshape(5, 5)  # 2 pixels to the left
    assert left.argmax() == 2 * 5 + 2 and perturb_input(dot, "shift", 0.0, np.array([np.pi]), spec).tolist() == \
        dot.tolist()
    tokens = InputSpec("sequence", (6,), "int64", 4, 2)
    X = np.array([[1, 3, 1, 0, 2, 2]] * 200, dtype=np.float32)
    base = draw_input("substitute", len(X), tokens, np.random.default_rng(0))
    assert set(np.unique(base[1])) == {0, 1, 3}  # never the padding id
    dropped = perturb_input(X, "dropout", 0.5, base, tokens)
    assert (dropped[:, 4:] == 2).all() and 0.4 < (dropped[:, :4] == 2).mean() < 0.6
    swapped = perturb_input(X, "substitute", 1.0, base, tokens)
    assert (swapped[:, 4:] == 2).all() and (swapped[:, :4] != 2).all() and swapped.max() < 4
