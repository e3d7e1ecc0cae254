"""The README's "Your own model" example is examples/own-model/ exactly: the README shows its files verbatim, and
those files, copied into a project, train a champion of their family through the real pipeline."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import onnx
import pytest
import yaml

from flows.pipeline import training_pipeline
from ottimo import InputSpec, vocab
from ottimo.compress import techniques
from ottimo.config import deep_merge, load_params
from ottimo.models.family import build, count_parameters, recipe
from ottimo.onnx.export import export_onnx
from ottimo.registry import versions
from ottimo.registry.tracking import connect
from tests.conftest import REPO, write_project

EXAMPLE = REPO / "examples" / "own-model"
FAMILY, MODULE = "mynet", "mymodels"
QUICK = {  # on top of the example's params: few epochs, two short trials of the smaller nets, no compression
    "train": {"max_epochs": 8},  # (tested apart below)
    "families": {FAMILY: {"trial_epochs": 2, "space": {"channels": [8, 16], "blocks": {"low": 1, "high": 1}}}},
    "tune": {"enabled": True, "n_trials": 2, "n_jobs": 1},
    "compress": {"enabled": False},
    "gate": {"min_accuracy": 0.8},
    "card": {"importance_rows": 50, "importance_repeats": 1, "batch_sizes": [1, 64], "seconds_per_batch_size": 0.05},
}


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Your own model\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


@pytest.fixture
def fresh_module():
    """The example's module imported afresh from where the test puts it (not a copy another test imported)."""
    def forget() -> None:
        for name in [m for m in sys.modules if m == MODULE or m.startswith(MODULE + ".")]:
            del sys.modules[name]

    forget()
    yield
    forget()


def test_the_readme_shows_every_example_file_verbatim():
    section = readme_section()
    blocks = [m.group(1) for m in re.finditer(r"^```[\w-]*\n(.*?)^```$", section, re.S | re.M)]
    files = example_files()
    assert {p.relative_to(EXAMPLE).as_posix() for p in files} == {"mymodels/net.py", "params.yaml"}
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        assert f"`{rel}`" in section, f"the README's section does not name {rel}"
        assert path.read_text() in blocks, f"{rel} differs from every code block of the README's section"
    assert "<!-- section: families" not in (REPO / "README.md").read_text()  # the placeholder is gone


def test_the_example_prunes_structurally_and_exports_with_its_input_shape(tmp_path, fresh_module, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    params = load_params(REPO / "params.yaml")  # the builder and hparams as the example's params give them
    example = yaml.safe_load((EXAMPLE / "params.yaml").read_text())
    params = params.overridden(example)
    spec = InputSpec("image", tuple(example["data"]["input"]["shape"]), "float32")
    model = build(recipe(params.families, params.train, FAMILY), spec, 10).eval()
    pruned = techniques.structured_prune(model, spec, 10, 0.5)
    assert count_parameters(pruned) < 0.5 * count_parameters(model)  # torch-pruning keeps the residual consistent
    path = export_onnx(pruned, spec, tmp_path / "pruned.onnx")
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 8, 8]


def test_the_example_family_trains_a_champion_through_the_pipeline(tmp_path, prefect_harness, fresh_module):
    example = yaml.safe_load((EXAMPLE / "params.yaml").read_text())
    project = write_project(tmp_path / "project", deep_merge(example, QUICK))
    for path in example_files():  # the example's files as a user copies them (params.yaml laid over above)
        if path.name != "params.yaml":
            (project / path.relative_to(EXAMPLE)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, project / path.relative_to(EXAMPLE))
    hits = subprocess.run(["grep", "-rl", FAMILY, "ottimo", "tasks", "flows"], cwd=REPO, capture_output=True)
    assert hits.returncode == 1, hits.stdout  # Ottimo's code does not know the family

    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    params = load_params(project / "params.yaml")
    assert params.train.candidates == [FAMILY] and params.families[FAMILY].builder == "mymodels.net:build"
    assert sys.modules[f"{MODULE}.net"].__file__ == str(project / "mymodels" / "net.py")  # the project's copy
    client, exp = connect(project, params.mlflow)
    name = params.mlflow.registered_model
    mv = versions.alias_version(client, name, versions.CHAMPION)
    assert mv.tags[vocab.FAMILY] == FAMILY
    onnx_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{versions.CHAMPION}"))
    graph = onnx.load(str(next(onnx_dir.rglob("*.onnx")))).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, 8, 8]  # a dynamic batch axis, then the family's input

    # the tuned values went where the README says: training settings to the recipe, the rest to build()
    run = client.get_run(mv.run_id)
    assert run.data.tags[vocab.FAMILY_RUN] == FAMILY and run.data.tags["tuned"] == "true"
    r = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="recipe.json",
                                                              dst_path=str(tmp_path / "recipe"))).read_text())
    assert set(r["hparams"]) == {"channels", "blocks", "hidden", "dropout"}
    assert r["hparams"]["channels"] in (8, 16) and r["batch_size"] in (32, 64, 128)
    assert client.search_runs([exp], f"tags.`{vocab.RUN_NAME}` = 'tune-{FAMILY}'")
