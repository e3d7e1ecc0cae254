"""A PostgreSQL cluster of our own on loopback: throw-away for tests, persistent under `.run/` for `make up`.

`Cluster(data_dir, port).init()` runs `initdb` once with a generated superuser password (secrets) kept in a 0600
file beside the cluster, plus a libpq pgpass file (0600) so that every client connects with a URL that holds no
password: libpq (psycopg) and asyncpg read the file named by PGPASSFILE (`Cluster.env()`), or by `?passfile=`.
The password never goes into argv, env, URLs or logs. Host connections use scram-sha-256; the server listens on
`host` only (127.0.0.1 by default) and its unix socket lives in the data folder, not /var/run.

As root (CI) the cluster belongs to the `postgres` system user Debian's package creates, and `initdb`/`pg_ctl`
run through `runuser -u postgres --`; as anyone else they run directly, as that user. No Prefect here.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "run `make postgres` (apt-get install postgresql) or set OTTIMO_PG_BINDIR to the folder holding them"
SERVICE_USER = "postgres"  # the system user that owns the cluster when we run as root
SOCKET_MAX = 107  # bytes of a unix socket path (sun_path) on Linux, including the file name


class ClusterError(RuntimeError):
    """The cluster could not be set up, started or reached; the message says what to do."""


def bindir() -> Path:
    """The folder with initdb and pg_ctl: OTTIMO_PG_BINDIR, `pg_config --bindir`, Debian's
    /usr/lib/postgresql/<newest>/bin, or PATH."""
    candidates = [os.environ.get("OTTIMO_PG_BINDIR", "")]
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versions, key=lambda p: int(re.sub(r"\D", "", Path(p).parent.name) or 0), reverse=True)
    candidates.append(str(Path(shutil.which("initdb") or "/nonexistent").parent))
    for c in filter(None, candidates):
        if (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    raise ClusterError(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _as_root() -> bool:
    return os.geteuid() == 0


def _service_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise ClusterError(f"running as root, and initdb refuses root, but there is no {SERVICE_USER!r} system user "
                           f"to own the cluster: {INSTALL_HINT} (the package creates it)") from None


def _owner() -> tuple[int, int]:
    """uid, gid the cluster's files belong to: postgres as root, else ourselves."""
    if _as_root():
        u = _service_user()
        return u.pw_uid, u.pw_gid
    return os.getuid(), os.getgid()


def _traversable(folder: Path, uid: int, gids: set[int]) -> bool:
    st = folder.stat()
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def check_reachable(folder: Path) -> None:
    """The cluster's owner must be able to walk down to `folder` (pytest's tmp_path, under a 0700 root-owned
    folder, is not reachable by postgres): raise naming the first folder that blocks it."""
    uid, gid = _owner()
    gids = {gid, *(g.gr_gid for g in _groups(uid))}
    for parent in reversed([folder, *folder.parents]):
        if parent.exists() and not _traversable(parent, uid, gids):
            st = parent.stat()
            raise ClusterError(
                f"the {pwd.getpwuid(uid).pw_name} user cannot reach {parent} (mode {stat.S_IMODE(st.st_mode):04o}, "
                f"owner {pwd.getpwuid(st.st_uid).pw_name}), so it cannot run a cluster in {folder}: put the cluster "
                f"under a folder it can traverse (the project's .run/, or a tempfile.mkdtemp() under /tmp) "
                f"or `chmod o+x {parent}`")


def _groups(uid: int) -> list:
    import grp

    name = pwd.getpwuid(uid).pw_name
    return [g for g in grp.getgrall() if name in g.gr_mem]


def _write_private(path: Path, text: str, owner: tuple[int, int] | None = None) -> None:
    """Create `path` 0600 from the start (never world-readable, not even for a moment), then hand it over."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if owner:
        os.chown(path, *owner)


def _pgpass_field(v: str) -> str:
    return v.replace("\\", "\\\\").replace(":", "\\:")


@dataclass(frozen=True)
class Cluster:
    """One PostgreSQL cluster: data in `data_dir`, listening on host:port only, superuser `user`."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    user: str = "ottimo"
    durable: bool = True  # False: no fsync (a throw-away cluster for tests; a crash of the machine loses it)
    max_connections: int = 200  # many Optuna workers, Prefect's and MLflow's pools

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).absolute())

    # --- files -----------------------------------------------------------------------------------------------

    @property
    def password_file(self) -> Path:
        """The superuser's generated password, 0600, beside the data folder."""
        return self.data_dir.with_name(self.data_dir.name + ".password")

    @property
    def pgpass_file(self) -> Path:
        """libpq's password file for this cluster, 0600, owned by whoever runs the clients."""
        return self.data_dir.with_name(self.data_dir.name + ".pgpass")

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def socket_dir(self) -> str:
        """The data folder, or '' (TCP only) when the socket's path would be too long for a unix socket."""
        return str(self.data_dir) if len(f"{self.data_dir}/.s.PGSQL.{self.port}.lock") <= SOCKET_MAX else ""

    def env(self) -> dict[str, str]:
        """What a client process needs in its environment to log in with `url()`."""
        return {"PGPASSFILE": str(self.pgpass_file)}

    def url(self, db: str, driver: str = "psycopg") -> str:
        """A SQLAlchemy URL without a password: postgresql+psycopg://ottimo@127.0.0.1:PORT/db (driver 'asyncpg'
        for Prefect's server). The client finds the password through PGPASSFILE (env())."""
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{db}"

    def conninfo(self, db: str = "postgres") -> dict:
        """psycopg.connect keyword arguments: the pgpass file named explicitly, no password."""
        return {"host": self.host, "port": self.port, "user": self.user, "dbname": db,
                "passfile": str(self.pgpass_file), "connect_timeout": 10}

    # --- commands --------------------------------------------------------------------------------------------

    def _run(self, tool: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(bindir() / tool), *args]
        if _as_root():
            _service_user()
            cmd = ["runuser", "-u", SERVICE_USER, "--", *cmd]
        # cwd "/": the service user may not be allowed into ours (root's home is 0700)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/", check=False)
        if check and out.returncode:
            raise ClusterError(f"{tool} {' '.join(args[:2])} failed (exit {out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[-1500:]}")
        return out

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def init(self) -> Cluster:
        """initdb once (a no-op on an existing cluster); (re)write the pgpass file from the password file."""
        if self.initialized():
            if not self.password_file.is_file():
                raise ClusterError(f"cluster {self.data_dir} exists but its password file {self.password_file} is "
                                   f"gone: remove {self.data_dir} to start afresh (its data is lost)")
        else:
            self._initdb()
        self._write_pgpass()
        return self

    def _initdb(self) -> None:
        owner = _owner()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        check_reachable(self.data_dir.parent)
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise ClusterError(f"{self.data_dir} is not empty and holds no cluster: remove it or pick another folder")
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data_dir, *owner)
        _write_private(self.password_file, secrets.token_urlsafe(32) + "\n", owner)
        self._run("initdb", "-D", str(self.data_dir), "-U", self.user, f"--pwfile={self.password_file}",
                  "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
                  "--no-instructions", *([] if self.durable else ["--no-sync"]), timeout=300)
        self._write_hba()

    def _write_hba(self) -> None:
        """Password (scram-sha-256) for every connection, from loopback only (or `host`'s own network)."""
        lines = ["# written by ottimo.ops.postgres: scram-sha-256 everywhere, loopback only",
                 "local all all scram-sha-256",
                 "host all all 127.0.0.1/32 scram-sha-256",
                 "host all all ::1/128 scram-sha-256"]
        if not self.host.startswith("127.") and self.host not in ("localhost", "::1"):
            lines.append("host all all samenet scram-sha-256")
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text("\n".join(lines) + "\n")
        os.chown(hba, *_owner())

    def _write_pgpass(self) -> None:
        password = self.password_file.read_text().strip()
        lines = [f"{_pgpass_field(h)}:*:*:{_pgpass_field(self.user)}:{_pgpass_field(password)}"
                 for h in dict.fromkeys((self.host, "localhost", self.socket_dir or "localhost"))]
        _write_private(self.pgpass_file, "\n".join(lines) + "\n")

    def running(self) -> bool:
        if not self.initialized():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False).returncode == 0

    def start(self, timeout: float = 60) -> Cluster:
        """Start the server (init() first if needed) and wait until it accepts connections."""
        self.init()
        if self.running():
            return self
        options = [f"-c listen_addresses={shlex.quote(self.host)}", f"-p {self.port}",
                   f"-c unix_socket_directories={shlex.quote(self.socket_dir)}",
                   f"-c max_connections={self.max_connections}", "-c password_encryption=scram-sha-256"]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        out = self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                        "-t", str(int(timeout)), "-o", " ".join(options), timeout=timeout + 30, check=False)
        if out.returncode:
            raise ClusterError(f"postgres did not start on {self.host}:{self.port} within {timeout:.0f} s "
                               f"(is the port taken?): {(out.stderr or out.stdout).strip()[-500:]}\n"
                               f"server log {self.log_file}:\n{self.log_tail()}")
        return self

    def stop(self, timeout: float = 60) -> None:
        """Stop the server (fast shutdown: open sessions are ended); nothing if it is not running."""
        if self.running():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", str(int(timeout)),
                      timeout=timeout + 30)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def connect(self, db: str = "postgres"):
        """A psycopg connection (autocommit) as the superuser, password from the pgpass file."""
        import psycopg

        try:
            return psycopg.connect(**self.conninfo(db), autocommit=True)
        except psycopg.OperationalError as err:
            raise ClusterError(f"cannot connect to {self.url(db)} (is the cluster started? `Cluster.start()`): "
                               f"{err}") from err

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` unless it exists (safe when two processes race); returns its psycopg URL."""
        import psycopg
        from psycopg import errors, sql

        with self.connect() as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                except (errors.DuplicateDatabase, errors.UniqueViolation):
                    pass
                except psycopg.Error as err:
                    raise ClusterError(f"cannot create database {name!r}: {err}") from err
        return self.url(name)

    def remove(self) -> None:
        """Stop the server and delete the cluster with its password and pgpass files."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.password_file.unlink(missing_ok=True)
        self.pgpass_file.unlink(missing_ok=True)


def stop_cluster(data_dir: Path) -> bool:
    """`pg_ctl stop -m fast` the cluster in `data_dir` when it runs (its port does not matter); False when not."""
    cluster = Cluster(data_dir, 0)
    if not cluster.running():
        return False
    cluster.stop()
    return True


@contextmanager
def temporary(prefix: str = "ottimo-pg-", **kwargs) -> Iterator[Cluster]:
    """A started throw-away cluster on a free port in a fresh folder under the system temp dir (reachable by the
    postgres user: the folder is 0711, the files in it 0600/0700), stopped and deleted afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o711)
    kwargs = {"durable": False, **kwargs}
    cluster = Cluster(folder / "pg", kwargs.pop("port", None) or free_port(), **kwargs)
    try:
        yield cluster.start()
    finally:
        try:
            cluster.remove()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
