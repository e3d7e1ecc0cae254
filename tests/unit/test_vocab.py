"""The vocabulary reads tags by their current names and by the names stored before it (LEGACY)."""

from __future__ import annotations

from ottimo import vocab
from ottimo.registry import promotion


def test_current_names_win_and_legacy_names_are_still_read():
    assert vocab.tag({"gate.verdict": "passed", "gate_verdict": "failed"}, vocab.GATE_VERDICT) == "passed"
    assert vocab.tag({"gate_verdict": "failed"}, vocab.GATE_VERDICT) == "failed"
    assert vocab.tag({"data_revision": "abc"}, vocab.DATA_REVISION) == "abc"
    assert vocab.tag({}, vocab.GATE_REASONS, "") == ""
    assert vocab.tag({"sha256": "x"}, vocab.SHA256) == "x"  # names without a legacy spelling


def test_clip_fits_a_tag():
    assert len(vocab.clip("x" * 9000)) == vocab.TAG_LIMIT and vocab.clip(3) == "3"


def test_a_version_tagged_with_the_old_spelling_is_still_servable(tmp_path):
    from tests.helpers.reliability_helpers import add_version, store

    _, _, client, exp = store(tmp_path / "project")
    name = "m"
    old = add_version(client, exp, name, tmp_path / "art", verdict=None)
    client.set_model_version_tag(name, old, "gate_verdict", "passed")  # as written before the vocabulary
    assert promotion.servable(client, name, old)
    client.set_model_version_tag(name, old, "gate_verdict", "failed")
    assert not promotion.servable(client, name, old)
