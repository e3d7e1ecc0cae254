"""The served model and how it follows an alias of the registry.

`Follower.check()` asks the registry where the alias points; when that is a version not served yet (and not
refused already), it downloads the ONNX file through `security.fetch_verified` (pickle off, sha256 against
the version's tag, no external data), opens a session through `serving_session`, checks it against the
version's training schema and warms it, all beside the version that keeps answering; then one assignment
swaps `current`. A request holds the `Served` it started with, so it finishes on that version. A version that
fails any step is refused: the old one keeps serving, and the refusal is logged and shown by GET /model.
The version swapped out stays loaded as the `spare`: a rollback to it (the alias back at it, with the same
sha256 tag) swaps back at once, without downloading it again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ottimo import vocab
from ottimo.card.store import prepared_for
from ottimo.config import Params
from ottimo.data.batches import schema_of
from ottimo.data.inputs import spec_of
from ottimo.onnx.export import INPUT, OUTPUT, shaped
from ottimo.onnx.metadata import read_classes
from ottimo.registry import versions
from ottimo.registry.security import fetch_verified, serving_session
from ottimo.registry.tracking import connect
from ottimo.spec import InputSpec

log = logging.getLogger("ottimo.serve")
KEEP, LOAD = "keep", "load"
WARM_RUNS = 5


@dataclass(frozen=True)
class Served:
    """One loaded, verified, warmed version: what a request runs on from start to end."""

    name: str
    version: str
    sha256: str
    data_revision: str
    features: list[str]
    labels: list[int] | list[str]  # the classes as the training data wrote them: output i is labels[i]
    session: ort.InferenceSession = field(repr=False)
    loaded_at: str  # UTC, ISO 8601
    load_seconds: float
    spec: InputSpec | None = None  # the rows it takes (its data revision's schema.json); requests are checked by it

    def logits(self, X: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: shaped(self.session, X)})[0]

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "data_revision": self.data_revision, "features": len(self.features), "classes": self.labels,
                "loaded_at": self.loaded_at, "load_seconds": self.load_seconds}


@dataclass(frozen=True)
class Refusal:
    version: str
    reason: str
    at: str


def step(target: str | None, serving: str | None, refused: str | None, force: bool = False) -> str:
    """What a check does: LOAD the version the alias points at, or KEEP what serves. Nothing to load when the
    alias points nowhere (the current version keeps serving) or already at the served version; a refused version
    is tried again only when asked (`force`: SIGHUP or POST /reload), not at every poll."""
    if target is None or target == serving:
        return KEEP
    if target == refused and not force:
        return KEEP
    return LOAD


def reusable(spare: Served | None, version: str | None, sha256: str | None) -> bool:
    """Whether the spare session may serve `version` again: the same version, still tagged with the same sha256
    (a changed tag means the file must be fetched and verified again)."""
    return spare is not None and spare.version == version and bool(sha256) and spare.sha256 == sha256


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Follower:
    """Holds the served version of `params.deploy.serve.alias` and replaces it when the alias moves."""

    def __init__(self, root: Path, params: Params) -> None:
        self.root, self.params = root, params
        self.name, self.alias = params.mlflow.registered_model, params.deploy.serve.alias
        self.client, _ = connect(root, params.mlflow)
        self.current: Served | None = None
        self.spare: Served | None = None  # the version swapped out last: a rollback to it needs no download
        self.refused: Refusal | None = None
        self.target: str | None = None  # where the alias pointed at the last check
        self.checked_at: str | None = None
        self.error: str | None = None  # the last check could not ask the registry
        self._lock = threading.Lock()  # one check at a time (the poller, a reload)
        self._wake = threading.Event()

    def check(self, force: bool = False) -> str:
        """Ask the registry once and act (KEEP or LOAD); never raises: a failure is recorded and logged."""
        with self._lock:
            try:
                mv = versions.alias_version(self.client, self.name, self.alias)
            except Exception as err:  # registry out of reach: keep serving, say so
                self.error = f"registry not reachable: {type(err).__name__}: {str(err)[:300]}"
                log.warning("%s; v%s keeps serving", self.error, self.serving)
                return KEEP
            self.error, self.checked_at = None, now()
            self.target = None if mv is None else str(mv.version)
            refused = self.refused.version if self.refused else None
            action = step(self.target, self.serving, refused, force)
            if action == LOAD and reusable(self.spare, self.target, mv.tags.get("sha256")):
                self._swap(self.spare, "kept in memory since it was replaced")
            elif action == LOAD:
                self._load(self.target)
            return action

    @property
    def serving(self) -> str | None:
        return self.current.version if self.current else None

    def _load(self, version: str) -> None:
        t0 = time.perf_counter()
        try:
            new = self._open(version, t0)
        except Exception as err:
            self.refused = Refusal(version, f"{type(err).__name__}: {err}", now())
            log.error("REFUSED %s v%s (%s -> v%s): %s; %s", self.name, version, self.alias, version,
                      self.refused.reason, f"v{self.serving} keeps serving" if self.current else "nothing is served")
            return
        self._swap(new, f"verified; loaded and warmed in {new.load_seconds:.2f} s")

    def _swap(self, new: Served, how: str) -> None:
        before = self.current
        self.current, self.spare, self.refused = new, before, None  # the swap: `current` is one assignment
        log.info("serving %s v%s (%s; sha256 %s…, %s)%s", self.name, new.version, self.alias, new.sha256[:12], how,
                 f", replacing v{before.version}" if before else "")

    def _open(self, version: str, t0: float) -> Served:
        dst = self.root / "mlruns" / "work" / f"serve-v{version}"
        path, mv = fetch_verified(self.client, self.name, version, dst)
        revision = vocab.tag(mv.tags, vocab.DATA_REVISION, "")
        schema = schema_of(prepared_for(self.root, revision))
        sess = serving_session(path, mv.tags["sha256"], self.params.deploy.serve.threads)
        check_classes(read_classes(path), schema["labels"])
        served = Served(self.name, str(mv.version), mv.tags["sha256"], revision, list(schema["features"]),
                        list(schema["labels"]), sess, now(), 0.0, spec_of(schema))
        warm(served, self.params.deploy.serve.max_rows)
        return replace(served, load_seconds=round(time.perf_counter() - t0, 3))

    def wake(self) -> None:
        """Check now (and retry a refused version): SIGHUP and POST /reload."""
        self._wake.set()

    def follow(self, stop: threading.Event) -> None:
        """The poller: a check every poll_seconds, or at once when woken, until `stop` is set."""
        while not stop.is_set():
            forced = self._wake.wait(self.params.deploy.serve.poll_seconds)
            self._wake.clear()
            if not stop.is_set():
                self.check(force=forced)

    def state(self) -> dict:
        """GET /model: what serves, where the alias points, the last refusal."""
        return {"name": self.name, "alias": self.alias, "serving": self.current.describe() if self.current else None,
                "alias_points_at": self.target, "checked_at": self.checked_at,
                "poll_seconds": self.params.deploy.serve.poll_seconds, "registry_error": self.error,
                "refused": asdict(self.refused) if self.refused else None}


def check_classes(in_file: list | None, schema: list) -> None:
    """A file that names its classes (ONNX metadata `ottimo.classes`) must name those of its training schema, in
    the same order; a file logged before classes were recorded (None) is taken on its schema alone."""
    if in_file is not None and list(in_file) != list(schema):
        raise ValueError(f"the ONNX file's classes {in_file[:20]} are not those of its training schema "
                         f"{list(schema)[:20]}; it would answer with the wrong labels")


def warm(served: Served, max_rows: int) -> None:
    """Run the new session before it answers anyone: one row and a full batch, the output shape checked."""
    for n in (1, max_rows):
        for _ in range(WARM_RUNS if n == 1 else 1):
            out = served.logits(np.zeros((n, len(served.features)), dtype=np.float32))
        if out.shape != (n, len(served.labels)):
            raise ValueError(f"the model answers shape {list(out.shape)} for {n} row(s) of {len(served.features)} "
                             f"features; its training schema has {len(served.labels)} classes")
