"""Alias moves as one unit: serialised by a lock, compare-then-set on the champion, journaled for crash recovery.

A move (promotion, rollback, repair) takes the model's lock, finishes or undoes any move a dead process left,
checks that `champion` is still the version the caller based its decision on, writes its intent to a journal
(a registered-model tag), moves the aliases one by one, writes the version tags that belong to the move (a
rollback's rolled_back/restored), then clears the journal. An exception undoes the move
at once; a hard crash leaves the journal, and the next move, `ottimo doctor` or the pipeline's start finishes it
(when its target is servable) or undoes it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ottimo import vocab
from ottimo.ops.faults import checkpoint
from ottimo.registry.sqlite_store import PREFIX, cache_dir
from ottimo.registry.versions import CHAMPION, PREVIOUS, aliases

JOURNAL_LIMIT = vocab.TAG_LIMIT  # a registered-model tag value: the journal entry must fit whole


class PromotionError(RuntimeError):
    """An alias move was refused; the registry is as it was."""


class NoPreviousChampion(RuntimeError):
    """Rollback asked for, but there is no `previous-champion` (or no champion) to swap with: nothing changed."""


class ChampionChanged(PromotionError):
    """`champion` is no longer the version the decision to move was based on."""


class PromotionBusy(PromotionError):
    """Another promotion, rollback or repair of the same model held the lock for longer than the timeout."""


def lock_path(client: MlflowClient, name: str) -> Path:
    """The lock file of `name`: beside a sqlite store (every process that can open the store sees it), else in
    locks/ of ottimo's cache folder (sqlite_store.cache_dir) keyed by the store URI (serialises the processes of
    this host only)."""
    uri = client.tracking_uri
    key = hashlib.sha256(f"{uri}|{name}".encode()).hexdigest()[:16]
    if uri.startswith(PREFIX):
        folder = Path(uri.removeprefix(PREFIX)).parent / "locks"
    else:
        folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.lock"


@contextmanager
def exclusive(client: MlflowClient, name: str, timeout: float = 120) -> Iterator[None]:
    """Hold the promotion lock of `name` (re-entrant in one thread). The OS releases it when a process dies,
    so a crashed holder never blocks the next one."""
    path = lock_path(client, name)
    lock = FileLock(str(path), is_singleton=True)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise PromotionBusy(
            f"another promotion, rollback or repair of {name} has held {path} for over {timeout:.0f} s; nothing "
            "was changed. Wait for it to finish and run again (raise reliability.lock_timeout_seconds to wait "
            "longer); the lock of a process that died is released by the OS.") from None
    try:
        yield
    finally:
        lock.release()


def journal(client: MlflowClient, name: str) -> dict | None:
    """The alias move a process started and did not finish, or None."""
    try:
        raw = client.get_registered_model(name).tags.get(vocab.JOURNAL)
    except MlflowException:
        return None
    return json.loads(raw) if raw else None


def servable(client: MlflowClient, name: str, version: str | None, gate: bool = True) -> bool:
    """A version that may be champion: it exists, passed the gate (unless `gate` is False: a rollback to a former
    champion, a manual promotion that ran its own gate or was forced) and carries the sha256 of its ONNX file."""
    if version is None:
        return True
    try:
        tags = client.get_model_version(name, version).tags
    except MlflowException:
        return False
    return (not gate or vocab.tag(tags, vocab.GATE_VERDICT) == vocab.PASSED) and bool(tags.get(vocab.SHA256))


def finishable(client: MlflowClient, name: str, entry: dict) -> bool:
    """Whether a journaled move may be finished: its new champion is servable by the rule the move was made under."""
    return servable(client, name, entry["target"].get(CHAMPION), entry.get("gate", True))


def since_now() -> str:
    """A champion_since value: now, ISO 8601 in UTC with milliseconds (readable in the registry UI)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def since_seconds(value: str | None, default: float = float("inf")) -> float:
    """A champion_since value as Unix seconds: ISO 8601, or the Unix float older versions were tagged with."""
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        stamp = datetime.fromisoformat(value)
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def _apply(client: MlflowClient, name: str, target: dict[str, str | None], history: bool = True) -> None:
    """Set (or delete, for None) each alias in order; the crash hook sits between two moves. `history`: stamp
    the new champion's champion_since (not when undoing)."""
    for i, (alias, version) in enumerate(target.items()):
        if i:
            checkpoint("between-alias-moves")
        if version is None:
            if alias in aliases(client, name):
                client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, str(version))
    if history and target.get(CHAMPION):
        client.set_model_version_tag(name, target[CHAMPION], vocab.CHAMPION_SINCE, since_now())


def _tag(client: MlflowClient, name: str, tags: list) -> None:
    """The version tags a move carries ([version, key, value] each): written once its aliases are set, before its
    journal is cleared, so a crash in between leaves them in the journal for `recover` to write."""
    for version, key, value in tags:
        client.set_model_version_tag(name, version, key, value)


def recover(client: MlflowClient, name: str) -> str | None:
    """Finish a journaled move when its new champion is servable, else undo it; say what was done (None: no
    journal). Call it holding the lock: a journal seen under the lock was left by a process that died."""
    entry = journal(client, name)
    if entry is None:
        return None
    target, before = entry["target"], entry["before"]
    finish = finishable(client, name, entry)
    _apply(client, name, target if finish else before, history=finish)
    if finish:
        _tag(client, name, entry.get("tags", []))
    client.delete_registered_model_tag(name, vocab.JOURNAL)
    done = "finished" if finish else "undone (its new champion is not servable)"
    return f"interrupted {entry['op']} {before} -> {target} {done}"


def move(client: MlflowClient, name: str, target: dict[str, str | None], expected_champion: str | None,
         op: str, timeout: float = 120, gate: bool = True,
         tags: list[tuple[str, str, str]] | None = None) -> dict[str, str]:
    """Move aliases to `target` ({alias: version, or None to remove}) as one unit, if `champion` is still
    `expected_champion`; return the aliases after. Already at `target`: nothing changes (idempotent rerun).
    `gate=False` lets a version without a passed gate verdict become champion (its sha256 is still required).
    `tags` ((version, key, value) each) are part of the move: journaled with it, written after the aliases, and
    written by whoever finishes the move when this process dies in between.

    Raises ChampionChanged when another move got there first, PromotionBusy when the lock is not free in time.
    """
    target = {a: None if v is None else str(v) for a, v in target.items()}
    expected = None if expected_champion is None else str(expected_champion)
    with exclusive(client, name, timeout):
        recover(client, name)
        before = aliases(client, name)
        if all(before.get(a) == v for a, v in target.items()):
            return before
        if before.get(CHAMPION) != expected:
            raise ChampionChanged(
                f"{op} refused: champion of {name} is now {_v(before.get(CHAMPION))}, not {_v(expected)} as when "
                "this decision was taken (another promotion or rollback came first); nothing was changed. "
                "Run again to decide against the current champion.")
        if target.get(CHAMPION) and not servable(client, name, target[CHAMPION], gate):
            raise PromotionError(f"{op} refused: {name} v{target[CHAMPION]} has not passed the gate or has no sha256 "
                                 "tag, so it may not be champion; nothing was changed.")
        entry = {"op": op, "before": {a: before.get(a) for a in target}, "target": target, "at": time.time(),
                 "gate": gate, "tags": [[str(v), k, vocab.clip(x)] for v, k, x in tags or []]}
        client.set_registered_model_tag(name, vocab.JOURNAL, json.dumps(entry))
        try:
            _apply(client, name, target)
            if entry["tags"]:
                checkpoint("before-rollback-tags")
                _tag(client, name, entry["tags"])
        except BaseException as err:
            try:
                _apply(client, name, entry["before"], history=False)
                client.delete_registered_model_tag(name, vocab.JOURNAL)
            except Exception:  # noqa: BLE001 - the store is still away: the journal stays for the next move
                err.add_note(f"Undoing the {op} failed too; its journal stays on {name}: the next promotion, "
                             "`ottimo doctor --repair` or the next pipeline run finishes or undoes it.")
            raise
        client.delete_registered_model_tag(name, vocab.JOURNAL)
        return aliases(client, name)


def promote(client: MlflowClient, name: str, version: str, expected_champion: str | None,
            timeout: float = 120, gate: bool = True) -> dict[str, str]:
    """champion -> previous-champion, `version` -> champion, if champion is still `expected_champion`."""
    version = str(version)
    current = aliases(client, name).get(CHAMPION)
    if current == version:  # a rerun after success: nothing to move, previous-champion stays right
        return move(client, name, {CHAMPION: version}, current, "promote", timeout, gate)
    target: dict[str, str | None] = {PREVIOUS: expected_champion} if expected_champion not in (None, version) else {}
    return move(client, name, target | {CHAMPION: version}, expected_champion, "promote", timeout, gate)


def rollback(client: MlflowClient, name: str, reason: str, expected_champion: str | None = None,
             decision: str | None = None, timeout: float = 120) -> dict[str, str]:
    """previous-champion -> champion and champion -> previous-champion through `move` (locked, journaled,
    compare-then-set); tag the event on both versions; return the aliases after.

    `expected_champion`: the champion the decision to roll back was taken on (None: the champion now). `decision`:
    an id of that decision (a drift-check run, a flow run); rerun after it was carried out, it changes nothing.
    Raises NoPreviousChampion (nothing to swap with) or ChampionChanged (another move came first).
    """
    from datetime import UTC, datetime

    with exclusive(client, name, timeout):
        recover(client, name)
        now = aliases(client, name)
        current, previous = now.get(CHAMPION), now.get(PREVIOUS)
        expected = current if expected_champion is None else str(expected_champion)
        if current != expected:
            by = client.get_model_version(name, expected).tags.get(vocab.ROLLBACK_BY) if previous == expected else None
            if decision and by == decision:  # this very rollback was carried out before (a rerun)
                return now
            raise ChampionChanged(
                f"rollback refused: champion of {name} is now {_v(current)}, not {_v(expected)} as when the rollback "
                "was decided (another promotion or rollback came first); nothing was changed. Check the aliases "
                "(`ottimo status`) and run again if a rollback is still wanted.")
        if current is None or previous is None or current == previous:
            raise NoPreviousChampion(
                f"{name}: no previous-champion to roll back to (champion {current or 'none'}); "
                "nothing changed. Promote a known-good version with the `promote` flow instead.")
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        limit = (JOURNAL_LIMIT - 1000) // 2  # both reasons and the journal's own fields fit one tag value
        tags = [(current, vocab.ROLLED_BACK, vocab.clip(f"{stamp}: replaced by v{previous}: {reason}", limit)),
                (previous, vocab.RESTORED, vocab.clip(f"{stamp}: restored over v{current}: {reason}", limit))]
        if decision:
            tags.append((current, vocab.ROLLBACK_BY, vocab.clip(decision)))
        # the tags go with the move (journaled): a crash after the aliases moved cannot lose them
        return move(client, name, {CHAMPION: previous, PREVIOUS: current}, current, "rollback", timeout, gate=False,
                    tags=tags)


def _v(version: str | None) -> str:
    return "none" if version is None else f"v{version}"
