"""Reading an admin's homeserver.yaml for the command-line tools.

The tools run outside Synapse (``synapse-msc3916 ... -c homeserver.yaml``), so they open
Synapse's database themselves, with the connection settings Synapse uses.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

MODULE_NAME = "synapse_msc3916.AuthenticatedMediaModule"
PROVIDER_NAME = "synapse_msc3916.DedupStorageProvider"


class ToolError(Exception):
    """A problem the command line reports as one line and a non-zero exit."""


def load(path: str | Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise ToolError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ToolError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ToolError(f"{path} is not a Synapse configuration (no mapping at the top)")
    return config


def module_config(config: dict[str, Any]) -> dict[str, Any] | None:
    for entry in config.get("modules") or []:
        if isinstance(entry, dict) and entry.get("module") == MODULE_NAME:
            return dict(entry.get("config") or {})
    return None


def provider_entry(config: dict[str, Any]) -> dict[str, Any] | None:
    for entry in config.get("media_storage_providers") or []:
        if isinstance(entry, dict) and entry.get("module") == PROVIDER_NAME:
            return entry
    return None


class Database:
    """A DB-API connection to Synapse's database with ``?`` placeholders on both engines."""

    def __init__(self, conn: Any, engine: str):
        self.conn = conn
        self.engine = engine

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.engine == "postgres" else sql

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        cur = self.conn.cursor()
        cur.execute(self._sql(sql), tuple(args))
        return cur

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self.execute(sql, args)
        rows = cur.fetchall()
        cur.close()
        return rows

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()


def connection_errors() -> tuple[type[BaseException], ...]:
    """The drivers' errors for a connection that broke or a database that went away
    (DB-API ``OperationalError`` and ``InterfaceError``): what a database restart does to
    a running tool."""
    import sqlite3

    errors: list[type[BaseException]] = [sqlite3.OperationalError, sqlite3.InterfaceError]
    try:
        import psycopg2
    except ImportError:  # a SQLite-only install
        pass
    else:
        errors += [psycopg2.OperationalError, psycopg2.InterfaceError]
    return tuple(errors)


@contextmanager
def open_database(config: dict[str, Any]) -> Iterator[Database]:
    database = connect(config)
    try:
        yield database
    finally:
        database.close()


def connect(config: dict[str, Any]) -> Database:
    """A new connection to Synapse's database (the caller closes it): the parallel tools
    open one per worker thread."""
    db = config.get("database") or {}
    name = db.get("name", "sqlite3")
    args = dict(db.get("args") or {})
    if name in ("sqlite3", "sqlite"):
        path = args.get("database")
        if not path:
            raise ToolError("database.args.database is not set")
        if not Path(path).exists():
            raise ToolError(f"the SQLite database {path} does not exist")
        conn = sqlite3.connect(path, timeout=30)
        database = Database(conn, "sqlite")
    elif name in ("psycopg2", "psycopg"):
        try:
            import psycopg2
        except ImportError:
            raise ToolError("psycopg2 is needed for a PostgreSQL database") from None
        for key in ("cp_min", "cp_max", "cp_reconnect", "cp_openfun"):
            args.pop(key, None)
        try:
            conn = psycopg2.connect(**args)
        except Exception as e:
            raise ToolError(f"cannot connect to PostgreSQL: {str(e).strip()}") from None
        database = Database(conn, "postgres")
    else:
        raise ToolError(f"unsupported database engine {name!r}")
    return database
