"""Media-deletion seam: database triggers that tombstone every media row Synapse deletes.

Synapse never tells a storage provider that media was deleted (admin delete APIs,
``purge_media_cache``, ``media_retention``: all of them end in a ``DELETE`` on one of
its four media tables). A trigger on each of those tables records a tombstone in the
same transaction as Synapse's own ``DELETE``, so the provider learns of every deletion
exactly once, whichever code path made it, without polling and without clocks.

What this relies on is not a Python API but the shape of Synapse's tables: the four
table names and the columns that make up a media path (``synapse/media/filepath.py``):
``media_id`` for local media, ``media_origin`` + ``filesystem_id`` for remote media,
and the four ``thumbnail_*`` columns for thumbnails. Those have been stable since long
before 1.120; :func:`probe_tables_txn` checks them at start-up so that a Synapse that
changed them stops with one line instead of silently losing deletions.

The triggers are checked and (re)created at every start-up, because a Synapse schema
delta that rebuilds one of these tables drops its triggers.
"""

from __future__ import annotations

from typing import Any

from synapse_msc3916.storage.index import is_postgres
from synapse_msc3916.synapse_adapter.probes import method

NEEDS = [
    method(
        "synapse.module_api.ModuleApi.looping_background_call",
        "the storage deletion job's timer",
        params=("desc", "run_on_all_instances"),
    ),
]

TOMBSTONES = "msc3916_storage_tombstones"

# (Synapse table, expression of the origin, of the file id, thumbnail columns?)
# The file id is what the media path is built from: media_id for local media,
# filesystem_id for remote media.
MEDIA_TABLES: tuple[tuple[str, str | None, str, bool], ...] = (
    ("local_media_repository", None, "media_id", False),
    ("local_media_repository_thumbnails", None, "media_id", True),
    ("remote_media_cache", "media_origin", "filesystem_id", False),
    ("remote_media_cache_thumbnails", "media_origin", "filesystem_id", True),
)
_THUMB_COLUMNS = ("thumbnail_width", "thumbnail_height", "thumbnail_type", "thumbnail_method")


def trigger_name(table: str) -> str:
    """Versioned, so that a changed trigger body gets a new trigger (SQLite has no
    CREATE OR REPLACE TRIGGER); the old one is dropped by :func:`ensure_deletion_triggers_txn`."""
    return f"msc3916_tombstone_v2_{table}"


def _old_trigger_names(table: str) -> list[str]:
    # v1 did not record media_id (index schema version 3).
    return [f"msc3916_tombstone_v1_{table}"]


def required_columns(table: str) -> list[str]:
    for name, origin, file_id, thumb in MEDIA_TABLES:
        if name == table:
            columns = [c for c in (origin, file_id, "media_id") if c]
            return list(dict.fromkeys(columns)) + (list(_THUMB_COLUMNS) if thumb else [])
    raise KeyError(table)


def _insert_sql(origin: str | None, file_id: str, thumb: bool, now_sql: str) -> str:
    values = [
        f"OLD.{origin}" if origin else "NULL",
        f"OLD.{file_id}",
        *([f"OLD.{c}" for c in _THUMB_COLUMNS] if thumb else ["NULL"] * 4),
        now_sql,
        "OLD.media_id",  # remote media: Synapse's unique index is (media_origin, media_id)
    ]
    return (
        f"INSERT INTO {TOMBSTONES} (media_origin, file_id, thumbnail_width, thumbnail_height,"
        f" thumbnail_type, thumbnail_method, deleted_ts, media_id) VALUES ({', '.join(values)})"
    )


_SQLITE_NOW = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
_PG_NOW = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"


def probe_tables_txn(txn: Any) -> list[str]:
    """What is missing of the tables and columns the triggers need (empty when all is there)."""
    problems = []
    for table, *_ in MEDIA_TABLES:
        columns = required_columns(table)
        try:
            txn.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE 1 = 0", ())
            txn.fetchall()
        except Exception as e:  # the engines raise their own OperationalError/ProgrammingError
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"{table}({', '.join(columns)}): {first_line}")
            if is_postgres(txn):
                # PostgreSQL aborts the transaction on an error; nothing else can run.
                break
    return problems


def ensure_deletion_triggers_txn(txn: Any) -> list[str]:
    """Create the four tombstone triggers where they are missing; return the names created.

    Raises ``RuntimeError`` naming the table when Synapse's media tables do not have
    the columns the triggers read. Runs after the index schema (which creates the
    tombstone table) and, on PostgreSQL, under the same advisory lock.
    """
    problems = probe_tables_txn(txn)
    if problems:
        raise RuntimeError(
            "Synapse's media tables are not as expected, so deletions cannot be followed: "
            + "; ".join(problems)
        )
    created: list[str] = []
    postgres = is_postgres(txn)
    for table, origin, file_id, thumb in MEDIA_TABLES:
        name = trigger_name(table)
        for old in _old_trigger_names(table):
            txn.execute(
                f"DROP TRIGGER IF EXISTS {old} ON {table}" if postgres
                else f"DROP TRIGGER IF EXISTS {old}",
                (),
            )
            if postgres:
                txn.execute(f"DROP FUNCTION IF EXISTS {old}()", ())
        if postgres:
            txn.execute(
                f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $body$"
                f" BEGIN {_insert_sql(origin, file_id, thumb, _PG_NOW)}; RETURN NULL; END"
                " $body$",
                (),
            )
            txn.execute(
                "SELECT t.tgenabled FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE t.tgname = ? AND c.relname = ? AND n.nspname = current_schema()",
                (name, table),
            )
            row = txn.fetchone()
            if row is None:
                txn.execute(
                    f"CREATE TRIGGER {name} AFTER DELETE ON {table}"
                    f" FOR EACH ROW EXECUTE PROCEDURE {name}()",
                    (),
                )
                created.append(name)
            elif row[0] == "D":
                txn.execute(f"ALTER TABLE {table} ENABLE TRIGGER {name}", ())
                created.append(name)
        else:
            txn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ? AND tbl_name = ?",
                (name, table),
            )
            if txn.fetchone() is None:
                txn.execute(
                    f"CREATE TRIGGER IF NOT EXISTS {name} AFTER DELETE ON {table}"
                    f" FOR EACH ROW BEGIN {_insert_sql(origin, file_id, thumb, _SQLITE_NOW)}; END",
                    (),
                )
                created.append(name)
    return created


def deletion_triggers_present_txn(txn: Any) -> list[str]:
    """The tombstone triggers that exist (for tests and ``stats``)."""
    names = [trigger_name(t) for t, *_ in MEDIA_TABLES]
    if is_postgres(txn):
        txn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgname IN (?, ?, ?, ?) AND tgenabled <> 'D'",
            tuple(names),
        )
    else:
        txn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name IN (?, ?, ?, ?)",
            tuple(names),
        )
    return sorted(str(r[0]) for r in txn.fetchall())


def instance_name(hs: Any) -> str:
    return str(hs.get_instance_name())


def media_deletions_looping_call(api: Any, f: Any, msec: float, desc: str) -> None:
    """Call ``f`` every ``msec`` as a background process, on this process only.

    ``ModuleApi.looping_background_call`` (1.39+) wraps each call in a background
    process with its own logcontext on every supported release; the module decides
    itself which process runs the job (a lease in the database, ``storage/lease.py``),
    hence ``run_on_all_instances``.
    """
    api.looping_background_call(f, msec, desc=desc, run_on_all_instances=True)

