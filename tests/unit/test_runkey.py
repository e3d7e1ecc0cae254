"""The run key and the "nothing new" policy: the truth table of `decide`, and what the fingerprints see."""

from __future__ import annotations

import sys

import pytest

from ottimo import vocab
from ottimo.config import parse_params
from ottimo.registry.runkey import RunKey, code_fingerprint, decide, key_of, params_fingerprint

KEY = RunKey("a" * 32, "c" * 64, "p" * 64)


def champion_tags(data: str = KEY.data_revision, code: str | None = KEY.code, params: str | None = KEY.params,
                  legacy: bool = False) -> dict[str, str]:
    tags = {"data_revision" if legacy else vocab.DATA_REVISION: data}
    tags |= {vocab.CODE_FINGERPRINT: code} if code else {}
    return tags | ({vocab.PARAMS_FINGERPRINT: params} if params else {})


@pytest.mark.parametrize(("champion", "tags", "force", "nothing_new", "same_data", "changed", "says"), [
    (None, None, False, False, False, (), "no champion yet"),
    (None, None, True, False, False, (), "no champion yet"),
    ("3", champion_tags(), False, True, True, (), "nothing new since champion v3: same data revision aaaaaaaa, "
     "code and params; nothing trained. Pass force=true"),
    ("3", champion_tags(legacy=True), False, True, True, (), "nothing new since champion v3"),  # old tag spelling
    ("3", champion_tags(), True, False, True, (), "force=true: training although nothing is new since champion v3"),
    ("3", champion_tags(data="b" * 32), False, False, False, ("data revision",), "champion's bbbbbbbb, now aaaaaaaa"),
    ("3", champion_tags(code="x" * 64), False, False, True, ("code",), "new since champion v3: code; training"),
    ("3", champion_tags(params="x" * 64), False, False, True, ("params",), "new since champion v3: params"),
    ("3", champion_tags(data="b" * 32, params="x" * 64), False, False, False, ("data revision", "params"),
     "data revision, params"),
    ("3", champion_tags(code=None, params=None), False, False, True, ("code", "params"),
     "champion v3 has no code and params fingerprints"),  # registered before they were recorded: train
    ("3", champion_tags(data="b" * 32, code=None), False, False, False, ("code", "params"), "no code and params"),
])
def test_nothing_new_truth_table(champion, tags, force, nothing_new, same_data, changed, says):
    n = decide(KEY, champion, tags, force)
    assert (n.nothing_new, n.same_data, n.changed, n.champion, n.key) == (nothing_new, same_data, changed, champion,
                                                                          KEY)
    assert says in n.message, n.message


def test_params_fingerprint_sees_what_makes_the_model_and_not_where_it_is_kept_or_served():
    base = parse_params({})
    fp = params_fingerprint(base)
    assert fp == params_fingerprint(parse_params({})) and len(fp) == 64
    ignored = [{"deploy": {"prefect_port": 4300, "training_cron": None, "training_name": "hourly"}},
               {"mlflow": {"experiment": "other"}}, {"train": {"log_every": 1}}, {"drift": {"cooldown_hours": 1}},
               {"tune": {"runner": "dask", "dask_address": "tcp://127.0.0.1:8786"}}, {"card": {"top_features": 3}},
               {"compress": {"runner": "dask", "dask_address": "tcp://127.0.0.1:8786", "n_jobs": 1}},
               {"reliability": {"lock_timeout_seconds": 5}}, {"score": {"deployment_name": "x"}},
               {"project": {"name": "other"}}]
    for change in ignored:
        assert params_fingerprint(base.overridden(change)) == fp, change
    counted = [{"train": {"max_epochs": 3}}, {"project": {"seed": 7}}, {"families": {"mlp": {"hparams": {
        "hidden": [8]}}}}, {"tune": {"enabled": True}}, {"compress": {"enabled": True}},
        {"gate": {"min_gain": 0.0}}, {"evaluate": {"target": "edge", "runs": 10}}]
    for change in counted:
        assert params_fingerprint(base.overridden(change)) != fp, change


def test_code_fingerprint_covers_a_users_builder_module_and_not_the_serving_code(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text("def build(spec, n_classes):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mynets", None)
    builtin = code_fingerprint(["ottimo.models.builtin.mlp:build"])
    assert builtin == code_fingerprint([]) == code_fingerprint(["ottimo.models.builtin.cnn:build"])
    own = code_fingerprint(["mynets:build"])
    assert own != builtin and own == code_fingerprint(["mynets:build"])
    (tmp_path / "mynets.py").write_text("def build(spec, n_classes):\n    return 1\n")
    assert code_fingerprint(["mynets:build"]) != own  # the user edited their builder: something new
    assert code_fingerprint(["absent_module:build"]) not in (builtin, own)  # not importable: still a key


def test_key_of_uses_the_families_builders_and_the_effective_params():
    p = parse_params({})
    k = key_of(p, "rev")
    assert k.data_revision == "rev" and k == key_of(p, "rev")
    assert key_of(p.overridden({"train": {"max_epochs": 2}}), "rev").params != k.params
    assert set(k.tags()) == {vocab.DATA_REVISION, vocab.CODE_FINGERPRINT, vocab.PARAMS_FINGERPRINT}
