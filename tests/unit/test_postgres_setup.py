"""ottimo.ops.postgres without a server: where the binaries come from and what it says when they are missing."""

from __future__ import annotations

import pytest

from ottimo.ops import postgres as pg


def test_missing_binaries_say_make_postgres(monkeypatch, tmp_path):
    monkeypatch.setenv("OTTIMO_PG_BINDIR", str(tmp_path))
    monkeypatch.setattr(pg.shutil, "which", lambda _name: None)
    monkeypatch.setattr(pg.glob, "glob", lambda _pattern: [])
    with pytest.raises(pg.ClusterError, match="make postgres"):
        pg.bindir()


def test_bindir_override(monkeypatch, tmp_path):
    for tool in ("initdb", "pg_ctl"):
        (tmp_path / tool).write_text("")
    monkeypatch.setenv("OTTIMO_PG_BINDIR", str(tmp_path))
    assert pg.bindir() == tmp_path


def test_urls_hold_no_password(tmp_path):
    c = pg.Cluster(tmp_path / "pg", 5999)
    assert c.url("mlflow") == "postgresql+psycopg://ottimo@127.0.0.1:5999/mlflow"
    assert c.url("prefect", driver="asyncpg") == "postgresql+asyncpg://ottimo@127.0.0.1:5999/prefect"
    assert c.env() == {"PGPASSFILE": str(tmp_path / "pg.pgpass")}
    assert c.password_file == tmp_path / "pg.password"


def test_long_paths_fall_back_to_tcp_only(tmp_path):
    assert pg.Cluster(tmp_path / ("x" * 120), 5999).socket_dir == ""
    assert pg.Cluster(tmp_path / "pg", 5999).socket_dir == str(tmp_path / "pg")
