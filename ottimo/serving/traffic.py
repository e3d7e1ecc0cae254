"""Served traffic as monitoring batches: the rows the endpoint answered become files the drift check reads
exactly like scored batches.

A *segment* is the traffic of one version over a stretch of time: requests are appended (by one writer
thread, off the request path) to `<traffic_dir>/<segment>.jsonl`; the segment closes at `segment_rows` rows,
`segment_seconds` of age, a change of the answering version, or shutdown. Closing writes `<segment>.parquet`
(request_id, served_at, model_version, prediction, the features, and the target where labels came), records
it with `ledger.record_score` (a score run waiting in the next drift window) and writes its predictions file
last, as batch scoring does: a parquet file without one is still to be recorded (`batches.pending`), which is
how a crashed server's traffic is picked up on the next start. Labels (POST /labels, by the id a predict
answer gave) go into the segment while it is open, or into its file while no drift check has decided on it.
`traffic_max_mb` bounds the folder: decided segments are deleted oldest first; when that is not enough, new
traffic is not logged (counted as dropped in /health) until there is room.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from ottimo import vocab
from ottimo.config import Params
from ottimo.data import batches
from ottimo.monitor import ledger
from ottimo.onnx.export import sha256

log = logging.getLogger("ottimo.serve")
SOURCE = "serve"  # tag `source` of the score runs of served traffic
MAX_QUEUED_ROWS = 100_000  # rows waiting for the writer; beyond it traffic is dropped, never the request


class UnknownId(LookupError):
    """No logged request has that id (never logged, or its segment was deleted)."""


class TooLate(RuntimeError):
    """The request's segment was already decided on by a drift check: a label can no longer count."""


@dataclass(frozen=True)
class Segment:
    name: str
    version: str
    opened: float  # time.monotonic()
    rows: int = 0


def must_close(seg: Segment | None, version: str, rows: int, now: float, max_rows: int, max_seconds: float) -> bool:
    """Whether the open segment closes before `rows` more rows answered by `version` go in: another version,
    it would pass max_rows (a segment holds at least one request), or it is older than max_seconds."""
    if seg is None:
        return False
    return (seg.version != version or (seg.rows > 0 and seg.rows + rows > max_rows)
            or now - seg.opened >= max_seconds)


def request_id(segment: str, start: int, rows: int) -> str:
    """The id of one request's rows: its segment, first row and row count (what POST /labels names)."""
    return f"{segment}.{start}.{rows}"


def parse_id(rid: str) -> tuple[str, int, int]:
    """(segment, start, rows) of a request id; UnknownId when it is not one this server makes."""
    name, _, rest = rid.rpartition(".")
    name, _, start = name.rpartition(".")
    if not (name.startswith("serve-") and start.isdigit() and rest.isdigit()) or "/" in name or ".." in name:
        raise UnknownId(f"{rid!r} is not a request id; use the \"id\" of a /predict answer")
    return name, int(start), int(rest)


def segment_name() -> str:
    return f"serve-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


class TrafficLog:
    """Appends served rows and labels to segments; closes, records and bounds them on its own thread."""

    def __init__(self, root: Path, params: Params) -> None:
        self.root, self.params, self.cfg = root, params, params.deploy.serve
        self.folder = root / self.cfg.traffic_dir
        self.target = params.data.target
        self.seg: Segment | None = None
        self.unclosed: set[str] = set()  # segments whose .jsonl is still being written or closed
        self.dropped = self.queued = 0
        self.full = False
        self._state, self._files = threading.Lock(), threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ledger = None

    # --- the request path: no disk, no registry -----------------------------------------------------------------

    def append(self, version: str, features: list[str], X: np.ndarray, pred: list) -> str | None:
        """Queue one request's rows; return its id, or None when it was not logged (folder full, queue full)."""
        n, rows = len(X), X.tolist()
        with self._state:
            if self.full or self.queued + n > MAX_QUEUED_ROWS:
                self.dropped += n
                return None
            now = time.monotonic()
            if must_close(self.seg, version, n, now, self.cfg.segment_rows, self.cfg.segment_seconds):
                self._rotate()
            if self.seg is None:
                self.seg = Segment(segment_name(), version, now)
                self.unclosed.add(self.seg.name)
            rid = request_id(self.seg.name, self.seg.rows, n)
            self.seg = Segment(self.seg.name, version, self.seg.opened, self.seg.rows + n)
            self.queued += n  # queued under the lock: a segment's rows always come before its close
            self._queue.put(("rows", self.seg.name, {"id": rid, "version": version, "at": _utc(),
                                                     "features": features, "X": rows, "pred": pred}))
        return rid

    def _rotate(self) -> None:
        """Close the open segment (the state lock is held)."""
        if self.seg is not None:
            self._queue.put(("close", self.seg.name, None))
            self.seg = None

    # --- labels ------------------------------------------------------------------------------------------------

    def label(self, rid: str, labels: list) -> str:
        """Attach labels to the rows of request `rid`: "queued" (its segment is open: they go in when it closes) or
        "applied" (written into its file). UnknownId, TooLate or ValueError (wrong count) otherwise."""
        name, start, n = parse_id(rid)
        if len(labels) != n:
            raise ValueError(f"request {rid} answered {n} row(s); send {n} label(s), got {len(labels)}")
        with self._state:
            if name in self.unclosed:
                self._queue.put(("label", name, {"id": rid, "labels": labels}))
                return "queued"
        return self._apply(name, rid, labels)

    def _apply(self, name: str, rid: str, labels: list) -> str:
        """Write labels into a closed segment's file, if no drift check has decided on it yet."""
        with self._files:
            path = self.folder / f"{name}.parquet"
            if not path.is_file():
                raise UnknownId(f"no logged request {rid} in {self.cfg.traffic_dir} (not logged, or deleted after "
                                "its drift check)")
            run = self._score_run(path)
            if run is not None and run.data.tags.get(vocab.CHECKED) != "false":
                raise TooLate(f"the rows of {rid} were decided on by drift check {run.data.tags[vocab.CHECKED]}; "
                              "a label now would not count")
            df = pd.read_parquet(path)
            df = _with_labels(df, {rid: labels}, self.target)
            _write_atomic(df, path)
            if run is not None:
                client, _ = self._monitoring()
                client.set_tag(run.info.run_id, "labelled", "true")
                client.set_tag(run.info.run_id, "batch.sha256", sha256(path))
        return "applied"

    # --- the writer thread -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Pick up what a previous server left (open segments, unrecorded files), then start the writer."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for left in sorted(self.folder.glob("serve-*.jsonl")):
            self._close(left.stem)
        self._record_pending()
        self._thread = threading.Thread(target=self._run, name="traffic-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the open segment and wait until everything queued is written and recorded."""
        with self._state:
            self._rotate()
        self._queue.put(("stop", "", None))
        if self._thread is not None:
            self._thread.join(timeout=60)

    def flush(self) -> None:
        """Close the open segment now and wait until it is recorded (POST /traffic/flush, tests, shutdown)."""
        done = threading.Event()
        with self._state:
            self._rotate()
        self._queue.put(("done", "", done))
        done.wait(timeout=60)

    def _run(self) -> None:
        while True:
            try:
                kind, name, item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._close_if_stale()
                continue
            try:
                if kind == "stop":
                    return
                self._handle(kind, name, item)
            except Exception:  # the writer never dies: the segment stays on disk for the next start
                log.exception("traffic: %s of %s failed; it is retried on the next start", kind, name)

    def _handle(self, kind: str, name: str, item) -> None:
        if kind == "done":
            item.set()
        elif kind == "close":
            self._close(name)
        elif kind == "label" and not (self.folder / f"{name}.jsonl").is_file():
            self._apply(name, item["id"], item["labels"])  # its segment closed while the label waited
        else:
            if kind == "rows":
                with self._state:
                    self.queued -= len(item["X"])
            with self._files, open(self.folder / f"{name}.jsonl", "a") as f:
                f.write(json.dumps({kind: item}) + "\n")

    def _close_if_stale(self) -> None:
        with self._state:
            stale = self.seg is not None and time.monotonic() - self.seg.opened >= self.cfg.segment_seconds
            if stale:
                self._rotate()
        if self.full:
            self._bound()

    def _close(self, name: str) -> None:
        """jsonl → parquet → score run → predictions file; then the folder bound."""
        jsonl = self.folder / f"{name}.jsonl"
        with self._files:
            if jsonl.is_file():
                df = _segment_frame(jsonl, self.target)
                if len(df):
                    _write_atomic(df, self.folder / f"{name}.parquet")
                jsonl.unlink()
        with self._state:
            self.unclosed.discard(name)
        self._record_pending()
        self._bound()

    def _record_pending(self) -> None:
        for path in batches.pending(self.folder):
            try:
                self._record(path)
            except Exception as err:  # MLflow out of reach: the file waits, recorded at the next close or start
                log.warning("traffic: %s not recorded yet (%s: %s); it is retried at the next close",
                            path.name, type(err).__name__, str(err)[:200])
                return

    def _record(self, path: Path) -> None:
        df = pd.read_parquet(path)
        versions = df["model_version"].unique()
        version = str(versions[0])
        labelled = self.target in df.columns and bool(df[self.target].notna().any())
        client, exp = self._monitoring()
        out = batches.predictions_path(path)
        run_id = ledger.record_score(client, exp, path, out, len(df), labelled, version, sha256(path),
                                     {"source": SOURCE})
        preds = df["prediction"].tolist()
        batches.write_predictions(path, np.arange(len(df)), preds, version)
        log.info("traffic: %s closed, %d rows by v%s%s -> score run %s (next drift window)", path.name, len(df),
                 version, ", labelled" if labelled else "", run_id)

    def _monitoring(self):
        if self._ledger is None:
            self._ledger = ledger.connect_monitoring(self.root, self.params)
        return self._ledger

    def _score_run(self, path: Path):
        client, exp = self._monitoring()
        runs = client.search_runs([exp], f"tags.`{vocab.KIND}` = '{vocab.SCORE}' and tags.source = '{SOURCE}' "
                                  f"and tags.`batch.path` = '{path}'", max_results=1)
        return runs[0] if runs else None

    def _bound(self) -> None:
        """Keep the folder under traffic_max_mb: delete decided segments, oldest first; else stop logging."""
        limit = self.cfg.traffic_max_mb * 1e6
        files = sorted(self.folder.glob("serve-*"), key=lambda p: p.name)
        size = sum(p.stat().st_size for p in files if p.is_file())
        if size > limit:
            waiting = {r.data.tags.get("batch.path") for r in ledger.unchecked(*self._monitoring())}
            for path in [p for p in files if p.suffix == ".parquet" and not p.name.endswith(batches.PREDICTIONS)]:
                if size <= limit:
                    break
                if str(path) in waiting or not batches.predictions_path(path).is_file():
                    continue
                for f in (path, batches.predictions_path(path)):
                    size -= f.stat().st_size
                    f.unlink()
        full = size > limit
        if full != self.full:
            (log.warning if full else log.info)(
                "traffic: %s is %s (%.1f MB, deploy.serve.traffic_max_mb = %g)", self.cfg.traffic_dir,
                "full of segments no drift check has decided on yet: new traffic is not logged" if full
                else "below its bound again: traffic is logged", size / 1e6, self.cfg.traffic_max_mb)
        self.full = full

    def state(self) -> dict:
        return {"folder": self.cfg.traffic_dir, "open_segment": self.seg.name if self.seg else None,
                "open_rows": self.seg.rows if self.seg else 0, "queued_rows": self.queued,
                "dropped_rows": self.dropped, "full": self.full}


def _utc() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _segment_frame(jsonl: Path, target: str) -> pd.DataFrame:
    """The rows and labels of a segment's jsonl as one frame (a torn last line of a crash is skipped)."""
    frames, labels = [], {}
    for line in jsonl.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "rows" in entry:
            r = entry["rows"]
            df = pd.DataFrame(r["X"], columns=r["features"])
            df.insert(0, "request_id", r["id"])
            df.insert(1, "served_at", r["at"])
            df.insert(2, "model_version", r["version"])
            df.insert(3, "prediction", r["pred"])
            frames.append(df)
        elif "label" in entry:
            labels[entry["label"]["id"]] = entry["label"]["labels"]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return _with_labels(df, labels, target) if labels and len(df) else df


def _with_labels(df: pd.DataFrame, labels: dict[str, list], target: str) -> pd.DataFrame:
    """`df` with the target column set on the rows of each request id in `labels` (nullable integers, or text for
    text classes)."""
    text = any(isinstance(v, str) for values in labels.values() for v in values) or (
        target in df.columns and not pd.api.types.is_numeric_dtype(df[target]) and df[target].notna().any())
    kind = object if text else "Int64"
    col = df[target] if target in df.columns else pd.Series(pd.NA, index=df.index, dtype=kind)
    col = col.astype(kind)
    for rid, values in labels.items():
        rows = np.flatnonzero((df["request_id"] == rid).to_numpy())
        if len(rows) == len(values):
            col.iloc[rows] = values
        else:
            log.warning("traffic: labels for %s name %d rows, the segment has %d of them; ignored", rid, len(values),
                        len(rows))
    return df.assign(**{target: col})


def _write_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")  # neither a batch nor a predictions file
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
