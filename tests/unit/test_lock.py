"""The installed environment is exactly requirements.lock: every transitive package at its locked version."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# The project itself is installed editable and not locked; pip, setuptools and wheel come with any venv
# (setuptools is locked all the same, torch needs it at run time, and then its version is checked).
UNLOCKED = {PROJECT["name"], "pip", "setuptools", "wheel"}
FIX = "run `make install` to install the lock, or `make lock` if the change is meant (then commit requirements.lock)"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not an exact `name==version` pin"
            pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for dist in distributions():
        found.setdefault(canonical(dist.metadata["Name"]), []).append(dist.version)
    return found


def test_installed_environment_matches_lock():
    pins, have = locked(), installed()
    wrong = {n: (v, have.get(n)) for n, v in pins.items()
             if n not in have or len(have[n]) > 1 or Version(have[n][0]) != Version(v)}
    extra = {n: vs for n, vs in have.items() if n not in pins and n not in UNLOCKED}
    problems = [f"{n}: locked {v}, installed {', '.join(got) if got else 'nothing'}"
                for n, (v, got) in sorted(wrong.items())]
    problems += [f"{n}: installed {', '.join(vs)}, not in requirements.lock" for n, vs in sorted(extra.items())]
    assert not problems, "the environment differs from requirements.lock:\n  " + "\n  ".join(problems) + f"\n{FIX}"


def test_lock_pins_sqlalchemy_below_2_1():
    # Prefect 3.8.8's scheduler service fails on SQLAlchemy 2.1 (schedule_deployments: "Can't evaluate bulk DML
    # statement"), so no scheduled run is ever created; 2.0.x works (tests/system/test_schedule.py checks it fires).
    pins = locked()
    assert "sqlalchemy" in pins, "requirements.lock does not pin sqlalchemy"
    assert Version(pins["sqlalchemy"]) < Version("2.1"), f"requirements.lock pins sqlalchemy {pins['sqlalchemy']}"


def test_pyproject_pins_agree_with_lock():
    pins = locked()
    reqs = [Requirement(r) for r in PROJECT["dependencies"] + sum(PROJECT["optional-dependencies"].values(), [])]
    disagree = [f"{r}: locked {pins.get(canonical(r.name), 'not at all')}" for r in reqs
                if canonical(r.name) not in pins or not r.specifier.contains(pins[canonical(r.name)], prereleases=True)]
    assert not disagree, "pyproject.toml and requirements.lock disagree (run `make lock`):\n  " + "\n  ".join(disagree)
