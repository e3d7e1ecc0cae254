"""Models: seeded training, early stopping, an accuracy floor, ONNX parity, sha256 checks."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from ottimo.config import BUILTIN_FAMILIES, DataCfg, TrainCfg, parse_params
from ottimo.data.tables import builtin_frame, load_splits, prepare
from ottimo.models.family import recipe
from ottimo.models.train import fit
from ottimo.onnx.export import IntegrityError, ParityError, export_onnx, parity_check, sha256, verify_sha256
from ottimo.onnx.measure import predict, session
from ottimo.spec import InputSpec

CFG = TrainCfg(max_epochs=15, patience=4)
FAMILIES = parse_params({"families": {"mlp": {"hparams": {"hidden": [64]}}, "transformer": {"hparams": {
    "d_model": 16, "heads": 2, "layers": 1, "ff_dim": 32}}}}).families
R = {name: recipe(FAMILIES, CFG, name) for name in BUILTIN_FAMILIES}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    builtin_frame("digits").to_csv(root / "raw.csv", index=False)
    prepare(root, DataCfg(path="raw.csv"), root / "prepared")
    return load_splits(root / "prepared")


@pytest.fixture(scope="module")
def trained(splits):
    return {family: fit(R[family], splits, CFG, seed=0) for family in ("mlp", "transformer")}


def test_training_is_seeded(splits):
    cfg = CFG.model_copy(update={"max_epochs": 3})
    a, b = fit(R["mlp"], splits, cfg, seed=1), fit(R["mlp"], splits, cfg, seed=1)
    assert a.history == b.history
    c = fit(R["mlp"], splits, cfg, seed=2)
    assert c.history != a.history


def test_early_stopping_keeps_the_best_epoch(splits):
    cfg = CFG.model_copy(update={"max_epochs": 200, "patience": 3})
    result = fit(R["mlp"], splits, cfg, seed=0)
    assert result.epochs_run < 200
    assert result.epochs_run - result.best_epoch == 3
    best = min(h["val_loss"] for h in result.history)
    assert result.best_val_loss == best


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_accuracy_floor_on_digits(trained, splits, family):
    model = trained[family].model
    with torch.no_grad():
        acc = (model(torch.from_numpy(splits.X_test)).argmax(1).numpy() == splits.y_test).mean()
    assert acc >= 0.90, f"{family} reached only {acc:.3f}"


def test_nan_loss_raises_with_advice(splits):
    bad = copy.copy(splits)
    X = splits.X_train.copy()
    X[3, 10] = np.nan
    object.__setattr__(bad, "X_train", X)
    with pytest.raises(FloatingPointError, match="loss became nan at epoch 1"):
        fit(R["mlp"], bad, CFG, seed=0)


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_onnx_parity_with_dynamic_batch(trained, splits, family, tmp_path):
    model = trained[family].model
    path = export_onnx(model, splits.input, tmp_path / "m.onnx")
    assert parity_check(model, path, splits.X_test, 1e-4) <= 1e-4
    sess = session(path)
    for n in (1, 37):
        assert predict(sess, splits.X_test[:n]).shape == (n,)


def test_parity_failure_raises(trained, splits, tmp_path):
    model = copy.deepcopy(trained["mlp"].model)
    path = export_onnx(model, splits.input, tmp_path / "m.onnx")
    with torch.no_grad():
        model[1][-1].bias += 0.01  # the exported file no longer matches this model
    with pytest.raises(ParityError, match="differ from PyTorch"):
        parity_check(model, path, splits.X_test, 1e-4)


def test_sha256_refuses_a_tampered_file(trained, tmp_path):
    path = export_onnx(trained["mlp"].model, InputSpec.tabular(64), tmp_path / "m.onnx")
    digest = sha256(path)
    assert verify_sha256(path, digest) == path
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="refusing to load"):
        verify_sha256(path, digest)


def test_checkpoint_round_trip_is_weights_only(trained, tmp_path):
    model = trained["mlp"].model
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert np.isfinite(state["0.mean"].numpy()).all()
