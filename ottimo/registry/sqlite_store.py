"""A new project's MLflow SQLite store, copied from an empty one instead of made from scratch.

MLflow makes a SQLite store by running its whole chain of schema migrations (about 3 s here, on every new
project, every test's own store and every `make up` on a fresh folder). The result is the same file each time for
one MLflow version, so it is made once per version and machine, under the user's cache folder
($XDG_CACHE_HOME/ottimo, default ~/.cache/ottimo), and copied. The template holds MLflow's schema and its default
workspace only: the Default experiment (whose artifact location names a folder) is left out, and MLflow creates it
where it would have made it in a new store when it first opens the copy. MLflow checks the copy's schema version on
every open, as it checks any store. Where the cache cannot be written, MLflow makes the store as it always did.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from importlib.metadata import version
from pathlib import Path

PREFIX = "sqlite:///"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ottimo"


def template() -> Path:
    """The empty, migrated store for the installed MLflow, made (once) if missing; OSError if it cannot be."""
    path = cache_dir() / f"mlflow-{version('mlflow')}-store.db"
    if path.exists():
        return path
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        db = Path(tmp) / "store.db"
        SqlAlchemyStore(PREFIX + str(db), Path(tmp).as_uri()).engine.dispose()
        con = sqlite3.connect(db)
        try:
            with con:
                con.execute("DELETE FROM experiments WHERE experiment_id = 0")
        finally:
            con.close()
        os.replace(db, path)  # atomic: a process racing this one finds a whole file or none
    return path


def seed(db: Path) -> bool:
    """Put a copy of the template at `db` if there is no store there yet; False where it was not done (a store
    exists, or the cache cannot be written): MLflow then opens or makes the store itself."""
    if db.exists():
        return False
    try:
        src = template()
        db.parent.mkdir(parents=True, exist_ok=True)
        tmp = db.with_name(f".{db.name}.{os.getpid()}.seed")
        shutil.copyfile(src, tmp)
        try:
            os.link(tmp, db)  # never replaces a store another process made meanwhile
        finally:
            tmp.unlink()
    except OSError:
        return False
    return True


def seed_uri(uri: str) -> str:
    """`uri` as it is, after seeding its file when it names an absolute SQLite path (the other stores, servers
    and Postgres, make their own)."""
    if uri.startswith(PREFIX) and os.path.isabs(uri[len(PREFIX):]):
        seed(Path(uri[len(PREFIX):]))
    return uri


if __name__ == "__main__":  # `make install` makes the template, so even a machine's first project does not wait
    try:
        print(f"MLflow's empty SQLite store: {template()}")
    except OSError as e:
        print(f"MLflow's empty SQLite store not cached ({e}): each new project makes its own")
