"""The run key: what decides the model a pipeline run would make (data revision, code, params), and the policy
that a run whose key is the champion's trains nothing, since it would make the champion again.

- **data revision**: DVC's md5 of data/prepared (vocab.DATA_REVISION).
- **code fingerprint**: sha256 of the source of the `ottimo`, `tasks` and `flows` packages, less the parts that
  only run once a model exists (NOT_THE_MODEL: the CLI, serving, monitoring, operations, the scoring, drift,
  manual-promotion and repair steps), of the module of every builder named under `families:` that lives outside
  those packages (its own file; a helper module it imports is not in it), and of the installed versions of the
  libraries that compute the model (LIBRARIES). Paths are relative: two checkouts of the same code agree.
- **params fingerprint**: sha256 of the effective params (params.yaml with the flow run's overrides) less the keys
  that cannot change the model that reaches the gate (NOT_THE_MODEL_PARAMS: where things are stored or served,
  schedules, logging, what happens after promotion). When in doubt a key is in: a spurious retrain costs one run
  (and gate.min_gain keeps the champion), a wrongful skip hides a change.

No Prefect here; tasks/registry.py reads the champion's tags and records the key.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ottimo import vocab
from ottimo.config import Params

PACKAGES = ("ottimo", "tasks", "flows")
NOT_THE_MODEL = ("ottimo/cli", "ottimo/serving", "ottimo/monitor", "ottimo/ops", "flows/drift.py", "flows/score.py",
                 "flows/serve.py", "flows/manage.py", "tasks/drift.py", "tasks/score.py", "tasks/manage.py",
                 "tasks/doctor.py")
LIBRARIES = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "optuna", "torch-pruning")
NOT_THE_MODEL_PARAMS = (
    "project.name",
    "mlflow", "dvc",  # where runs, models and data are kept (the data itself is the data revision)
    "deploy", "score", "drift",  # servers, ports, schedules, deployment names; what happens to a served model
    "reliability", "limits",  # promotion lock and crash repair; input guards (what passes them: the data revision)
    "card",  # measured on the model already chosen (bounds on its figures are gate.card, which is in)
    "train.log_every",  # logging
    "tune.runner", "tune.dask_address", "tune.storage",  # where trials run and the study is kept
    "compress.runner", "compress.dask_address", "compress.n_jobs",  # where and how many variants are built at once
)


@dataclass(frozen=True)
class RunKey:
    data_revision: str
    code: str  # sha256 hex of the code fingerprint
    params: str  # sha256 hex of the params fingerprint

    def tags(self) -> dict[str, str]:
        return {vocab.DATA_REVISION: self.data_revision, vocab.CODE_FINGERPRINT: self.code,
                vocab.PARAMS_FINGERPRINT: self.params}


@dataclass(frozen=True)
class Novelty:
    key: RunKey  # this run's
    nothing_new: bool  # the run key is the champion's and force is off: train nothing
    champion: str | None  # the champion version compared with
    same_data: bool  # the champion was trained on this data revision (the gate then holds candidates to min_gain)
    changed: tuple[str, ...]  # what differs from the champion's key: "data revision", "code", "params"
    message: str  # what the run does and why, in a sentence


def key_of(params: Params, data_revision: str) -> RunKey:
    """The run key of a pipeline run with these (effective) params on this data revision."""
    builders = [f.builder for f in params.families.values()]
    return RunKey(data_revision, code_fingerprint(builders), params_fingerprint(params))


def params_fingerprint(params: Params) -> str:
    """sha256 of the params as canonical JSON, NOT_THE_MODEL_PARAMS left out."""
    tree = params.model_dump(mode="json")
    for dotted in NOT_THE_MODEL_PARAMS:
        *parents, leaf = dotted.split(".")
        node = tree
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def code_fingerprint(builders: Iterable[str] = ()) -> str:
    """sha256 over the model-deciding source files (relative path and bytes), the builders' modules and the
    LIBRARIES' versions."""
    h = hashlib.sha256()
    for name, content in sorted(_sources(builders)):
        h.update(name.encode() + b"\0" + content + b"\0")
    for lib in LIBRARIES:
        try:
            version = metadata.version(lib)
        except metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"{lib}=={version}\n".encode())
    return h.hexdigest()


def _sources(builders: Iterable[str]) -> list[tuple[str, bytes]]:
    out = []
    for pkg in PACKAGES:
        folder = _package_dir(pkg)
        if folder is None:
            out.append((f"{pkg}/", b"absent"))
            continue
        for path in folder.rglob("*.py"):
            name = f"{pkg}/{path.relative_to(folder).as_posix()}"
            if not any(name == x or name.startswith(x + "/") for x in NOT_THE_MODEL):
                out.append((name, path.read_bytes()))
    for module in sorted({b.partition(":")[0] for b in builders}):
        if module.split(".")[0] not in PACKAGES:  # a built-in family: already in
            out += _module_files(module)
    return out


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # a top-level name: located, not imported
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _module_files(module: str) -> list[tuple[str, bytes]]:
    """A builder's module file (a package: every .py file under it), named `builder:<module>[/file]`."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return [(f"builder:{module}", b"not found")]  # check_candidates names what to fix for a family in use
    if not spec.submodule_search_locations:
        return [(f"builder:{module}", Path(spec.origin).read_bytes())]
    folder = Path(spec.submodule_search_locations[0])
    return [(f"builder:{module}/{p.relative_to(folder).as_posix()}", p.read_bytes()) for p in folder.rglob("*.py")]


def decide(key: RunKey, champion: str | None, champion_tags: Mapping[str, str] | None, force: bool = False
           ) -> Novelty:
    """Whether a run with `key` has anything new to train against the champion (version `champion`, its registered
    version's tags): nothing new when the champion's data revision, code and params fingerprints all equal the
    key's and `force` is off. A champion without fingerprints (registered before they were recorded) is trained
    against: nothing says it is the same."""
    if champion is None:
        return Novelty(key, False, None, False, (), "no champion yet: training")
    tags = champion_tags or {}
    theirs = RunKey(vocab.tag(tags, vocab.DATA_REVISION) or "", tags.get(vocab.CODE_FINGERPRINT, ""),
                    tags.get(vocab.PARAMS_FINGERPRINT, ""))
    same_data = theirs.data_revision == key.data_revision
    rev = key.data_revision[:8]
    if not (theirs.code and theirs.params):
        return Novelty(key, False, champion, same_data, ("code", "params"),
                       f"champion v{champion} has no code and params fingerprints (registered before they were "
                       "recorded): training")
    changed = tuple(what for what, mine, its in (("data revision", key.data_revision, theirs.data_revision),
                                                 ("code", key.code, theirs.code),
                                                 ("params", key.params, theirs.params)) if mine != its)
    if changed:
        was = f" (champion's {theirs.data_revision[:8]}, now {rev})" if not same_data else ""
        return Novelty(key, False, champion, same_data, changed,
                       f"new since champion v{champion}: {', '.join(changed)}{was}; training")
    if force:
        return Novelty(key, False, champion, True, (),
                       f"force=true: training although nothing is new since champion v{champion} (same data "
                       f"revision {rev}, code and params); the gate holds it to gate.min_gain")
    return Novelty(key, True, champion, True, (),
                   f"nothing new since champion v{champion}: same data revision {rev}, code and params; nothing "
                   "trained. Pass force=true (`ottimo run --force`) to train anyway.")
