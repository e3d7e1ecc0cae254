"""A real PostgreSQL cluster of our own (ottimo.ops.postgres): password-less URLs through a pgpass file, the
password kept out of argv, env and the server log, loopback only, wrong passwords refused."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import psutil
import psycopg
import pytest
import sqlalchemy as sa

from ottimo.ops.postgres import Cluster, ClusterError, free_port

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _password(c: Cluster) -> str:
    return c.password_file.read_text().strip()


def _server_processes(c: Cluster) -> list[psutil.Process]:
    postmaster = psutil.Process(int((c.data_dir / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


def test_password_less_urls_connect(postgres: Cluster, monkeypatch):
    url = postgres.create_database("optuna")
    assert url == f"postgresql+psycopg://ottimo@127.0.0.1:{postgres.port}/optuna"
    assert postgres.create_database("optuna") == url  # idempotent
    assert _password(postgres) not in url
    monkeypatch.setenv("PGPASSFILE", postgres.env()["PGPASSFILE"])
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_user, current_database()")).one() == ("ottimo", "optuna")
    engine.dispose()


def test_asyncpg_reads_pgpassfile(postgres: Cluster, monkeypatch):
    """Prefect's server connects with asyncpg: PGPASSFILE is honoured there too."""
    from sqlalchemy.ext.asyncio import create_async_engine

    monkeypatch.setenv("PGPASSFILE", str(postgres.pgpass_file))

    async def who() -> str:
        engine = create_async_engine(postgres.url("postgres", driver="asyncpg"))
        async with engine.connect() as conn:
            user = (await conn.execute(sa.text("SELECT current_user"))).scalar_one()
        await engine.dispose()
        return user

    assert asyncio.run(who()) == "ottimo"


def test_secret_files_are_private(postgres: Cluster):
    for f in (postgres.password_file, postgres.pgpass_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert postgres.pgpass_file.stat().st_uid == os.getuid()  # libpq reads it as the client user
    assert stat.S_IMODE(postgres.data_dir.stat().st_mode) == 0o700
    assert len(_password(postgres)) >= 32


def test_password_in_no_argv_env_or_log(postgres: Cluster):
    password = _password(postgres)
    with postgres.connect() as conn:  # a session: one more backend process; a failed login logs a line
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(**{**postgres.conninfo(), "passfile": os.devnull}, password=password[::-1])
        procs = _server_processes(postgres)
        assert len(procs) >= 3  # postmaster, background workers, our backend
        seen = 0
        for p in procs:
            try:
                argv, env = p.cmdline(), p.environ()
            except psutil.NoSuchProcess:  # the refused login's backend may be exiting
                continue
            seen += 1
            assert not any(password in a for a in argv), argv
            assert not any(password in v for v in env.values())
        assert seen >= 3
    assert "password authentication failed" in postgres.log_file.read_text()
    assert password not in postgres.log_file.read_text()


def test_listens_on_loopback_only(postgres: Cluster):
    pids = {p.pid for p in _server_processes(postgres)}
    listening = [c.laddr for c in psutil.net_connections(kind="inet")
                 if c.pid in pids and c.status == psutil.CONN_LISTEN]
    assert listening and {a.ip for a in listening} == {"127.0.0.1"}, listening
    assert {a.port for a in listening} == {postgres.port}


def test_wrong_or_missing_password_refused(postgres: Cluster, tmp_path: Path):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**postgres.conninfo(), password="not-the-password")
    empty = tmp_path / "pgpass"
    empty.write_text("")
    empty.chmod(0o600)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(**{**postgres.conninfo(), "passfile": str(empty)})


def test_restart_keeps_data_and_password(postgres: Cluster):
    postgres.create_database("keep")
    password = _password(postgres)
    postgres.stop()
    assert not postgres.running()
    again = Cluster(postgres.data_dir, free_port(), durable=False).start()  # same folder, a new port
    try:
        assert _password(again) == password
        with again.connect("keep") as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("keep",)
    finally:
        again.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the postgres user's reach matters only when we run as root")
def test_unreachable_folder_named(tmp_path: Path):
    """pytest's tmp_path lies under a 0700 root folder the postgres user cannot enter: say so, early."""
    with pytest.raises(ClusterError, match="cannot reach .*pytest-of-root") as err:
        Cluster(tmp_path / "pg", free_port()).init()
    assert "chmod o+x" in str(err.value) and not (tmp_path / "pg").exists()
