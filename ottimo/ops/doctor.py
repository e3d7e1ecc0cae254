"""Find, and on request repair, what a crash or a killed process can leave in the registry and tracking store.

Checks: a half-done alias move (journal), MLflow runs left RUNNING by a process that is gone, versions whose
gate verdict never came, a challenger whose verdict is unknown, a missing champion, previous-champion equal to
champion, versions without a sha256 tag. `ottimo doctor` and the pipeline's start run the same checks.
`ottimo doctor` also finds Prefect flow runs still Running whose process is gone (`stale_flow_runs`: the decision
is here, the Prefect client that lists and sets them Crashed is in tasks/doctor.py: the core imports no Prefect).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from ottimo import vocab
from ottimo.config import ReliabilityCfg
from ottimo.registry import promotion
from ottimo.registry.versions import CHALLENGER, CHAMPION, ONNX_FILE, PREVIOUS, aliases

VERDICTS = ("passed", "failed")


@dataclass(frozen=True)
class Finding:
    check: str  # journal | stale-run | pending-verdict | challenger-unknown | champion-missing | previous-is-champion
    subject: str  # | sha256-missing | stale-flow-run
    problem: str
    action: str  # what --repair does (did), or what the user should do when it cannot be repaired
    repaired: bool | None  # None: report only (no safe automatic repair); False: not attempted (no --repair)


def owner() -> str:
    """This process, as a tag value other processes can check: host, pid, process start time."""
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": round(psutil.Process().create_time(), 3)})


def owner_alive(tag: str | None) -> bool | None:
    """True/False when the owner process runs on this host and is (not) alive; None when it cannot be checked."""
    if not tag:
        return None
    info = json.loads(tag)
    if info.get("host") != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(info["pid"]).create_time() - info["started"]) < 1.0  # not a reused pid
    except psutil.NoSuchProcess:
        return False


class Doctor:
    """The checks on one registered model and experiment; `repair` applies the safe repairs."""

    def __init__(self, client: MlflowClient, experiment_id: str, name: str, cfg: ReliabilityCfg, repair: bool):
        self.client, self.exp, self.name, self.cfg, self.repair = client, experiment_id, name, cfg, repair
        self.findings: list[Finding] = []
        self._runs: dict[str, object] = {}

    def run(self) -> list[Finding]:
        self.stale_runs()
        with promotion.exclusive(self.client, self.name, self.cfg.lock_timeout_seconds):
            self.half_done_move()
            versions = self._versions()
            self.pending_verdicts(versions)
            self.sha256_missing(versions)
            self.alias_states(self._versions())
        return self.findings

    def _note(self, check: str, subject: str, problem: str, action: str, fix=None) -> None:
        """Record a finding; with --repair run `fix` (None: report only)."""
        if fix is not None and self.repair:
            fix()
        self.findings.append(Finding(check, subject, problem, action, None if fix is None else self.repair))

    def _versions(self) -> list:
        try:
            return sorted(self.client.search_model_versions(f"name = '{self.name}'"), key=lambda v: int(v.version))
        except MlflowException:
            return []

    def _run(self, run_id: str | None):
        if run_id and run_id not in self._runs:
            try:
                self._runs[run_id] = self.client.get_run(run_id)
            except MlflowException:
                self._runs[run_id] = None
        return self._runs.get(run_id) if run_id else None

    def dead(self, run) -> bool:
        """A run that is over: not RUNNING, or its owner process (its own or an ancestor's) is gone, or it cannot
        be checked and started more than stale_run_hours ago."""
        if run is None or run.info.status != "RUNNING":
            return True
        node, seen = run, set()
        while node is not None and node.info.run_id not in seen:
            seen.add(node.info.run_id)
            alive = owner_alive(node.data.tags.get(vocab.OWNER))
            if alive is not None:
                return not alive
            if vocab.OWNER in node.data.tags:
                break  # owner on another host
            node = self._run(node.data.tags.get(vocab.PARENT))
        return time.time() - run.info.start_time / 1000 > self.cfg.stale_run_hours * 3600

    def stale_runs(self) -> None:
        for run in self.client.search_runs([self.exp], "attributes.status = 'RUNNING'", max_results=5000):
            self._runs[run.info.run_id] = run
        for run in [r for r in self._runs.values() if r is not None and r.info.status == "RUNNING"]:
            if not self.dead(run):
                continue

            def fail(run_id=run.info.run_id) -> None:
                self.client.set_tag(run_id, vocab.FAILURE, "process died (found RUNNING by ottimo doctor)")
                self.client.set_terminated(run_id, "FAILED")

            self._note("stale-run", f"run {run.info.run_id} ({run.info.run_name})",
                       "RUNNING, but the process that ran it is gone", "mark it FAILED with the reason", fail)
        if self.repair:
            self._runs.clear()

    def half_done_move(self) -> None:
        entry = promotion.journal(self.client, self.name)
        if entry is not None:
            finish = promotion.finishable(self.client, self.name, entry)
            self._note("journal", f"aliases of {self.name}",
                       f"{entry['op']} {entry['before']} -> {entry['target']} was interrupted",
                       "finish it (its new champion is servable)" if finish else "undo it (target not servable)",
                       lambda: promotion.recover(self.client, self.name))

    def pending_verdicts(self, versions: list) -> None:
        for mv in versions:
            settled = vocab.tag(mv.tags, vocab.GATE_VERDICT) in (*VERDICTS, vocab.ABANDONED)
            if settled or not self.dead(self._run(mv.run_id)):
                continue

            def abandon(v=mv.version) -> None:
                self.client.set_model_version_tag(self.name, v, vocab.GATE_VERDICT, vocab.ABANDONED)
                self.client.set_model_version_tag(self.name, v, vocab.GATE_REASONS,
                                                  "its run died before the gate; run the pipeline again")

            self._note("pending-verdict", f"v{mv.version}",
                       f"gate verdict {mv.tags.get('gate_verdict', 'missing')!r}, and its run is over",
                       f"tag {vocab.GATE_VERDICT}={vocab.ABANDONED} (never served)", abandon)

    def sha256_missing(self, versions: list) -> None:
        for mv in versions:
            if mv.tags.get("sha256"):
                continue
            expected = (self._run(mv.run_id).data.tags.get("onnx.sha256") if self._run(mv.run_id) else None)
            if expected and self._artifact_sha256(mv.version) == expected:
                self._note("sha256-missing", f"v{mv.version}", "no sha256 tag",
                           "restore it from its run's onnx.sha256 (the file matches it)",
                           lambda v=mv.version, d=expected: self.client.set_model_version_tag(self.name, v, "sha256",
                                                                                              d))
            else:
                self._note("sha256-missing", f"v{mv.version}", "no sha256 tag, and no matching record in its run",
                           "cannot be verified, so it is never served; promote another version", None)

    def _artifact_sha256(self, version: str) -> str | None:
        from ottimo.onnx.export import sha256  # imports torch: only when a version lacks its sha256 tag

        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = download_artifacts(artifact_uri=f"models:/{self.name}/{version}", dst_path=tmp)
            except Exception:  # noqa: BLE001 - missing or unreadable artifact: nothing to verify
                return None
            path = Path(local) / ONNX_FILE
            return sha256(path) if path.is_file() else None

    def alias_states(self, versions: list) -> None:
        now = aliases(self.client, self.name)
        by_version = {str(v.version): v for v in versions}
        history = sorted((v for v in versions if vocab.CHAMPION_SINCE in v.tags),
                         key=lambda v: promotion.since_seconds(v.tags[vocab.CHAMPION_SINCE]), reverse=True)
        champion = now.get(CHAMPION)
        if champion is None and versions:
            restore = next((v for v in [str(h.version) for h in history] + [now.get(PREVIOUS)]
                            if v and promotion.servable(self.client, self.name, v)), None)
            if restore is not None:
                rest = next((str(h.version) for h in history if str(h.version) != restore
                             and promotion.servable(self.client, self.name, h.version)), None)
                self._note("champion-missing", f"aliases of {self.name}", "no champion, though one was promoted before",
                           f"champion -> v{restore} (the last servable champion), previous-champion -> "
                           f"{'v' + rest if rest else 'none'}",
                           lambda: self._set({CHAMPION: restore, PREVIOUS: rest}))
                champion, now = restore, {**now, CHAMPION: restore, PREVIOUS: rest}
            elif any(vocab.tag(v.tags, vocab.GATE_VERDICT) == vocab.PASSED for v in versions):
                self._note("champion-missing", f"aliases of {self.name}",
                           "no champion, and no version was ever champion", "run the pipeline again", None)
        if champion is not None and now.get(PREVIOUS) == champion:
            mine = by_version.get(champion)
            since = promotion.since_seconds(mine.tags.get(vocab.CHAMPION_SINCE)) if mine else float("inf")
            rest = next((str(h.version) for h in history if str(h.version) != champion
                         and promotion.since_seconds(h.tags[vocab.CHAMPION_SINCE]) < since), None)
            self._note("previous-is-champion", f"aliases of {self.name}", f"previous-champion = champion = v{champion}",
                       f"previous-champion -> {'v' + rest if rest else 'none'} (the champion before it)",
                       lambda: self._set({PREVIOUS: rest}))
        challenger = now.get(CHALLENGER)
        mv = by_version.get(challenger)
        if challenger is not None and (mv is None or vocab.tag(mv.tags, vocab.GATE_VERDICT) not in VERDICTS):
            latest = next((str(v.version) for v in reversed(versions)
                           if vocab.tag(v.tags, vocab.GATE_VERDICT) in VERDICTS), None)
            self._note("challenger-unknown", f"challenger v{challenger}",
                       f"gate verdict {mv.tags.get('gate_verdict', 'missing') if mv else 'version gone'!r}",
                       f"challenger -> {'v' + latest if latest else 'none'} (the latest version with a verdict)",
                       lambda: self._set({CHALLENGER: latest}))

    def _set(self, target: dict[str, str | None]) -> None:
        """Repairs move aliases through the journal too, so a crash during a repair is itself repairable."""
        current = aliases(self.client, self.name).get(CHAMPION)
        promotion.move(self.client, self.name, target, current, "repair", self.cfg.lock_timeout_seconds)


def examine(client: MlflowClient, experiment_id: str, name: str, cfg: ReliabilityCfg,
            repair: bool = False) -> list[Finding]:
    """Every inconsistency found (and, with `repair`, repaired where that is safe)."""
    return Doctor(client, experiment_id, name, cfg, repair).run()


@dataclass(frozen=True)
class FlowRun:
    """A Prefect flow run in state Running, as the doctor needs it (the Prefect layer reads it)."""
    id: str
    name: str
    drift_check_run: str | None = None  # a training pipeline started by a drift check's retrain: that check run


def flow_run_owners(client: MlflowClient, experiment_ids: list[str], flow_run_ids: list[str]) -> dict[str, list[str]]:
    """The owner tags of the MLflow runs (pipeline, drift-check) each flow run made, by flow-run id."""
    owners: dict[str, list[str]] = {}
    for flow_run in flow_run_ids:  # few: the flow runs Prefect shows Running
        runs = client.search_runs(experiment_ids, f"tags.`{vocab.FLOW_RUN}` = '{flow_run}'", max_results=1000)
        owners[flow_run] = [t for r in runs if (t := r.data.tags.get(vocab.OWNER))]
    return owners


def process_gone(owners: list[str], alive: Callable[[str | None], bool | None] = owner_alive) -> bool:
    """Whether the process of a flow run is known to be gone: an owner of its MLflow runs is dead, none is alive.
    No owner, or owners only on other hosts: it cannot be told, so it is left alone."""
    states = [alive(o) for o in owners]
    return False in states and True not in states


def stale_flow_runs(running: list[FlowRun], owners: Mapping[str, list[str]],
                    crash: Callable[[FlowRun, str], None] | None,
                    alive: Callable[[str | None], bool | None] = owner_alive) -> list[Finding]:
    """Flow runs Prefect still shows Running although the process that ran them is gone (killed, power cut): the
    process exited without telling the API. `crash(run, message)` sets one Crashed (None: report only, not
    attempted). A training run started by a drift check's retrain also needs its outcome on that check run: the
    caller's `crash` records it."""
    found = []
    for run in running:
        if not process_gone(owners.get(run.id, []), alive):
            continue
        message = "process died (found Running by ottimo doctor: the owner process of its MLflow runs is gone)"
        if crash is not None:
            crash(run, message)
        found.append(Finding("stale-flow-run", f"flow run {run.id} ({run.name})",
                             "Running in Prefect, but the process that ran it is gone",
                             "set it Crashed" + (f" and record the retrain as crashed on drift check "
                                                 f"{run.drift_check_run}" if run.drift_check_run else ""),
                             crash is not None))
    return found
