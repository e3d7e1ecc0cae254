"""What the orchestration does once instead of at every call must give what it gave before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper


def _tiny_onnx() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_explicit_onnx_requirements_are_what_mlflow_infers(tmp_path):
    """log_model is given onnx_requirements() so that it skips inferring them in a fresh interpreter: the
    environment files of the logged model must come out exactly as MLflow's inference writes them."""
    import mlflow.onnx

    from ottimo.registry.logged_model import onnx_requirements

    example = np.zeros((2, 3), dtype=np.float32)
    common = {"input_example": example, "save_as_external_data": False,
              "onnx_execution_providers": ["CPUExecutionProvider"]}
    mlflow.onnx.save_model(_tiny_onnx(), tmp_path / "inferred", **common)
    mlflow.onnx.save_model(_tiny_onnx(), tmp_path / "given", pip_requirements=list(onnx_requirements()), **common)
    for name in ("requirements.txt", "conda.yaml", "python_env.yaml"):
        assert (tmp_path / "given" / name).read_text() == (tmp_path / "inferred" / name).read_text(), name


def test_dvc_runs_in_this_process_and_leaves_it_as_it_was(tmp_path, monkeypatch):
    """init, add, remote, push and status through DVC's Python API: no `python -m dvc` per command, paths from
    the project and not the working directory, and nothing of DVC's left on this process's streams or loggers."""
    import logging
    import subprocess
    import sys

    from ottimo.data import versioning

    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "data" / "raw.csv").write_text("a,b\n1,2\n")
    monkeypatch.chdir(tmp_path)  # not the project
    streams = sys.stdout, sys.stderr
    versioning._dvc_api()  # `import dvc` wraps the streams (colorama) unless undone
    assert (sys.stdout, sys.stderr) == streams
    loggers = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level)
               for name in ("dvc", "dvc_objects", "dvc_data")}
    started: list = []
    popen = subprocess.Popen.__init__
    monkeypatch.setattr(subprocess.Popen, "__init__", lambda self, args, *a, **k: (started.append(args),
                                                                                     popen(self, args, *a, **k))[1])
    versioning.ensure_repo(root)
    versioning.track(root, "data/raw.csv")
    url = versioning.configure_remote(root, "Local", ".dvc-remote")
    assert versioning.status_cloud(root) == {"data/raw.csv": "new"}
    versioning.push(root)
    assert versioning.status_cloud(root) == {}
    assert not [a for a in started if "dvc" in map(str, a)], started
    assert (root / "data" / "raw.csv.dvc").is_file() and url == str(root / ".dvc-remote")
    assert "remote = local" in (root / ".dvc" / "config.local").read_text()
    assert "analytics = false" in (root / ".dvc" / "config").read_text()
    assert (sys.stdout, sys.stderr) == streams
    assert {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in loggers} == loggers


def test_dvc_failures_keep_dvc_words_and_chain_nothing(tmp_path):
    """A push the remote refuses is RemoteUnavailable (retried) with DVC's reason; nothing is chained on to it
    (the retry policy reads the chain); other failures are DvcError with DVC's reason."""
    import pytest

    from ottimo.data import versioning

    root = tmp_path / "project"
    root.mkdir()
    (root / "raw.csv").write_text("a\n1\n")
    versioning.ensure_repo(root)
    versioning.track(root, "raw.csv")
    (tmp_path / "remote").write_text("a file where the remote folder should be")
    versioning.configure_remote(root, "local", str(tmp_path / "remote"))
    with pytest.raises(versioning.RemoteUnavailable) as err:
        versioning.push(root)
    assert "`dvc push` failed in" in str(err.value) and "failed to push data to the cloud" in str(err.value)
    assert "Not a directory" in str(err.value)
    assert err.value.__cause__ is None and err.value.__context__ is None
    with pytest.raises(versioning.DvcError) as err:
        versioning.track(root, "missing.csv")
    assert not isinstance(err.value, versioning.RemoteUnavailable) and "missing.csv" in str(err.value)
    assert err.value.__context__ is None


def test_the_cli_exit_runs_every_exit_handler_then_skips_the_final_collections(tmp_path):
    """`ottimo`'s callback registers gc.freeze at exit; handlers registered before and after it still run."""
    import subprocess
    import sys

    code = (f"import atexit, gc, pathlib; p = pathlib.Path({str(tmp_path)!r})\n"
            "atexit.register(lambda: (p / 'before').write_text(str(gc.get_freeze_count() > 0)))\n"
            "from ottimo.cli.main import _quiet; _quiet(); _quiet()\n"
            "atexit.register(lambda: (p / 'after').write_text(str(gc.get_freeze_count() > 0)))\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (tmp_path / "after").read_text() == "False"  # ran before the freeze
    assert (tmp_path / "before").read_text() == "True"  # registered earlier, so run after it: still run


def test_flow_imports_pause_the_collector_then_freeze_what_they_made_and_restore_it():
    """The CLI imports a flow with the cyclic GC paused; afterwards what the import made is frozen (out of every
    later full collection), the GC is on again (off if the caller had it off), also when the import fails. In a
    subprocess: the freeze would otherwise cover this test session's heap."""
    code = (
        "import gc, json\n"
        "from ottimo.cli.common import flow_imports\n"
        "seen = {}\n"
        "before = gc.get_freeze_count()\n"
        "with flow_imports():\n"
        "    seen['inside'] = gc.isenabled()\n"
        "    import xml.dom.minidom  # not imported yet by ottimo.cli.common\n"
        "seen['after'] = gc.isenabled()\n"
        "seen['frozen'] = gc.get_freeze_count() - before\n"
        "node = xml.dom.minidom.Node\n"
        "seen['minidom_frozen'] = gc.is_tracked(node) and not any(o is node for o in gc.get_objects())\n"
        "try:\n"
        "    with flow_imports():\n"
        "        import no_such_module_here  # noqa\n"
        "except ImportError:\n"
        "    seen['after_failure'] = gc.isenabled()\n"
        "gc.disable()\n"
        "with flow_imports():\n"
        "    pass\n"
        "seen['stays_off'] = not gc.isenabled()\n"
        "print(json.dumps(seen))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["inside"] is False and seen["after"] is True and seen["after_failure"] is True
    assert seen["frozen"] > 1000, seen  # the process's objects so far, the new module's included
    assert seen["minidom_frozen"] is True  # a full collection no longer walks the imported module's class
    assert seen["stays_off"] is True


@pytest.mark.slow  # two processes that each start Prefect's temporary server, about 25 s
def test_prefect_api_starts_prefects_temporary_server_early_and_only_without_a_server(tmp_path, prefect_db):
    """`ottimo run` starts Prefect's temporary server while the pipeline imports, without importing Prefect's
    server package into its own process; the flow's client then uses that server, and it is gone after the
    command. Flow runs on it send no heartbeats (nothing outlives the command to watch them) unless the user set
    them. With PREFECT_API_URL set nothing is started."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ottimo.cli.common import prefect_api

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        before = os.environ.get("PREFECT_API_URL")
        prefect_api()()
        assert os.environ.get("PREFECT_API_URL") == before and PREFECT_API_URL.value() == "http://127.0.0.1:9/api"
    code = ("import json, sys\n"
            "from ottimo.cli.common import prefect_api\n"
            "prefect_api()()\n"
            "from prefect.client.orchestration import get_client\n"
            "from prefect.settings import get_current_settings\n"
            "with get_client(sync_client=True) as c:\n"
            "    url, status = str(c.api_url), c.hello().status_code\n"
            "print(json.dumps([url, status, 'prefect.server.api.server' in sys.modules,\n"
            "                  get_current_settings().flows.heartbeat_frequency]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY")}
    env |= {"PREFECT_HOME": str(tmp_path)}
    shutil.copy(prefect_db, tmp_path / "prefect.db")  # Prefect's database in that home, already migrated
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    url, status, server_imported, heartbeat = json.loads(out.stdout.strip().splitlines()[-1])
    assert url.startswith("http://127.0.0.1:") and status == 200 and server_imported is False
    assert heartbeat is None
    set_by_user = subprocess.run([sys.executable, "-c", code], env=env | {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "60"},
                                 capture_output=True, text=True, timeout=300)
    assert set_by_user.returncode == 0, set_by_user.stderr
    assert json.loads(set_by_user.stdout.strip().splitlines()[-1])[3] == 60
    assert "Starting temporary server on" in out.stderr + out.stdout
    from ottimo.ops.servers import answers

    assert not answers(url.rstrip("/") + "/health")  # stopped when the command ended


def test_a_new_sqlite_store_is_a_copy_of_the_empty_one_and_mlflow_opens_it_as_its_own(tmp_path, monkeypatch):
    """A new project's MLflow store is seeded from the cached empty store (made once per MLflow version): MLflow
    opens it without migrating, makes the Default experiment at this open (not the template's folder), and records
    runs in it; an existing store is never replaced; an unwritable cache leaves the store to MLflow."""
    import logging

    from mlflow import MlflowClient

    from ottimo.config import MlflowCfg
    from ottimo.registry import sqlite_store
    from ottimo.registry.tracking import connect

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("OTTIMO_TRACKING_URI", raising=False)
    template = sqlite_store.template()
    assert template.parent == tmp_path / "cache" / "ottimo" and template.stat().st_size > 0
    projects = []
    for name in ("a", "b"):  # two projects from one template: each its own store and artifact root
        root = tmp_path / name
        (root / "mlruns").mkdir(parents=True)
        migrating: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record, seen=migrating: seen.append(record.getMessage())
        logging.getLogger("mlflow.store.db.utils").addHandler(handler)
        try:
            client, exp = connect(root, MlflowCfg(experiment=f"exp-{name}"))
        finally:
            logging.getLogger("mlflow.store.db.utils").removeHandler(handler)
        assert not [m for m in migrating if "Creating initial MLflow database tables" in m]
        run = client.create_run(exp).info.run_id
        client.log_metric(run, "m", 1.0)
        default = client.get_experiment("0")  # made at this open, where MLflow puts it: not the template's folder
        assert default.name == "Default" and "cache" not in default.artifact_location
        projects.append((root, client, run))
    (root_a, client_a, run_a), (_, client_b, _) = projects
    assert client_a.get_run(run_a).data.metrics == {"m": 1.0}
    assert [e.name for e in client_b.search_experiments()] == ["exp-b", "Default"]
    store = root_a / "mlruns" / "mlflow.db"
    before = store.read_bytes()
    assert sqlite_store.seed(store) is False and store.read_bytes() == before  # a store is there: left alone

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # the cache folder cannot be made
    fresh = tmp_path / "c" / "mlflow.db"
    assert sqlite_store.seed(fresh) is False and not fresh.exists()
    client = MlflowClient(f"sqlite:///{fresh}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
