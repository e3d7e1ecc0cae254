"""params.yaml is validated before any work: errors name the key, the value and what is allowed."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ottimo.cli.main import app
from ottimo.config import ConfigError, Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_are_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    assert params.data.builtin == "digits"
    assert set(params.train.candidates) == {"mlp", "transformer"}
    assert params.gate.min_accuracy > 0


@pytest.mark.parametrize(
    ("patch", "key", "value_and_rule"),
    [
        ({"train": {"optimizer": "adagrad"}}, "train.optimizer", ["'adagrad'", "sgd", "rmsprop"]),
        ({"families": {"mlp": {"train": {"optimizer": "adagrad"}}}}, "families.mlp.train.optimizer", ["'adagrad'"]),
        ({"train": {"mlp": {"hidden": [8]}}}, "train.mlp", ["moved to families.mlp.hparams"]),
        ({"train": {"candidates": ["resnet"]}}, "train.candidates", ["'resnet' is not a model family", "cnn"]),
        ({"families": {"mynet": {"hparams": {}}}}, "families.mynet.builder", ["Field required"]),
        ({"families": {"mynet": {"builder": "mymodels/net.py"}}}, "families.mynet.builder", ["module.path:function"]),
        ({"gate": {"min_accuracy": 1.5}}, "gate.min_accuracy", ["1.5", "less than or equal to 1"]),
        ({"data": {"splits": {"train": 0.9}}}, "data.splits", ["must sum to 1.0"]),
        ({"data": {"path": "../outside.csv"}}, "data.path", ["'../outside.csv'", "inside the project"]),
        ({"data": {"path": "data/raw/x.xlsx"}}, "data.path", [".csv or .parquet"]),
        ({"score": {"incoming": "/srv/batches"}}, "score.incoming", ["'/srv/batches'", "inside the project"]),
        ({"score": {"quarantine": "data/q"}}, "score.quarantine", ["unknown key"]),  # one folder: limits.quarantine_dir
        ({"limits": {"quarantine_dir": "../q"}}, "limits.quarantine_dir", ["'../q'", "inside the project"]),
        ({"data": {"input": {"kind": "image"}}}, "data.input", ["needs its shape"]),
        ({"data": {"input": {"kind": "image", "shape": [8, 8]}}}, "data.input", ["[channels, height, width]"]),
        ({"gate": {"max_p95_latency": 3}}, "gate.max_p95_latency", ["unknown key"]),
        ({"train": {"candidates": ["mlp", "resnet"]}}, "train.candidates", ["'resnet'", "'transformer'"]),
    ],
)
def test_invalid_values_are_named(patch, key, value_and_rule):
    with pytest.raises(ConfigError) as err:
        parse_params(patch)
    msg = str(err.value)
    assert f"- {key}:" in msg
    for fragment in value_and_rule:
        assert fragment in msg


def test_defaults_fill_missing_sections():
    assert parse_params({}) == Params()


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_cli_stops_before_any_work_on_invalid_config(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["max_epochs"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["run", "--project-dir", str(project)])
    assert result.exit_code == 2
    assert "train.max_epochs" in result.output and "greater than or equal to 1" in result.output
    assert not (project / "mlruns").exists() and not (project / ".dvc").exists() and not (project / "data").exists()


def test_flow_run_overrides_are_validated_and_none_keeps_the_file():
    base = parse_params({})
    same = base.overridden({"train": {"max_epochs": None, "candidates": None}, "gate": {"min_accuracy": None}})
    assert same == base
    changed = base.overridden({"train": {"max_epochs": 3, "candidates": ["mlp"]}, "tune": {"enabled": True}})
    assert (changed.train.max_epochs, changed.train.candidates, changed.tune.enabled) == (3, ["mlp"], True)
    assert changed.train.patience == base.train.patience
    with pytest.raises(ConfigError, match="train.max_epochs: got 0"):
        base.overridden({"train": {"max_epochs": 0}})


def test_deploy_section_has_a_nightly_schedule_and_loopback_only():
    p = parse_params({})
    assert (p.deploy.training_cron, p.deploy.host, p.deploy.prefect_port, p.deploy.mlflow_port) == (
        "0 2 * * *", "127.0.0.1", 4200, 5000)
    with pytest.raises(ConfigError, match="deploy.host"):
        parse_params({"deploy": {"host": "0.0.0.0"}})


def test_training_flow_shows_typed_parameters_with_descriptions():
    from flows.pipeline import training_pipeline

    props = training_pipeline.parameters.model_dump()["properties"]
    assert props["candidates"]["anyOf"][0]["items"]["type"] == "string"  # any family of families:, not an enum
    assert "cnn" in props["candidates"]["description"]
    assert props["max_epochs"]["anyOf"][0]["type"] == "integer"
    assert props["min_accuracy"]["anyOf"][0]["type"] == "number"
    assert props["tune_enabled"]["anyOf"][0]["type"] == "boolean"
    assert all(props[k]["description"] for k in ("max_epochs", "min_accuracy", "tune_enabled", "candidates"))
