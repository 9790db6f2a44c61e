"""The path -> SHA-256 index, kept in Synapse's own database.

Synapse's storage-provider API only ever says "store this path" and "fetch this path";
it never deletes and never tells a provider what the bytes are. The index is therefore
the provider's memory: which content a path has, which blobs exist, and which blobs a
garbage collection is about to remove. Keeping it in Synapse's database (rather than in
the bucket) lets ``gc`` join it against Synapse's own media tables, and keeps it in the
same backups as the media metadata it describes.

Every function here takes a DB-API-like transaction whose ``execute`` accepts ``?``
placeholders (Synapse's ``LoggingTransaction``, or :class:`ToolTxn` for the CLI), and
uses only SQL that SQLite (>= 3.24) and PostgreSQL both understand.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import attr

SCHEMA_COMPONENT = "dedup_storage"
PATHS = "msc3916_storage_paths"
BLOBS = "msc3916_storage_blobs"
SCHEMA = "msc3916_storage_schema"
CLAIMS = "msc3916_storage_claims"
TOMBSTONES = "msc3916_storage_tombstones"
STATE = "msc3916_storage_state"
BOOTS = "msc3916_storage_boots"
LEASES = "msc3916_storage_leases"
TOTALS = "msc3916_storage_totals"
TOOL_RUNS = "msc3916_storage_tool_runs"

# Paths with no media row that no tombstone explains (an upload whose media row Synapse
# then failed to insert) are forgotten by ``gc`` only once they are this old: far longer
# than the moment between a provider returning and Synapse inserting its row.
UNEXPLAINED_PATH_MIN_AGE_MS = 60 * 60 * 1000
# ``gc`` releases any claim older than this (a CLI crash, a claim of no known boot).
CLAIM_STALE_MS = 24 * 60 * 60 * 1000
# Every running provider process (one "boot") refreshes its row in ``BOOTS`` this often;
# a boot not seen for ``BOOT_STALE_MS`` (by the database's clock) is dead, and its claims
# are released by whichever process notices first. Ten missed beats: a process stalled
# that long loses its uploads in flight (they fail, see ``record_path_txn``), never data.
BOOT_HEARTBEAT_MS = 30 * 1000
BOOT_STALE_MS = 5 * 60 * 1000

# How long a garbage collection may hold a blob in the "deleting" state before an
# upload of the same content takes the blob over, measured by the database's clock (the
# mark's time and the upload's "now" come from the same clock, whatever the processes'
# clocks say). It bounds how long an upload can wait; a GC deletes one object between
# marking and unmarking, which takes far less, and never starts a delete it could not
# finish within this time after marking (``lifecycle.delete_if_in_time``).
# It must stay shorter than the upload's wait (``provider._WAIT_FOR_GC_SECONDS``, 60 s) so
# that a gc that died between marking and deleting delays an upload instead of failing
# it, and longer than a deletion can take (``gc`` deletes with short S3 timeouts,
# ``tools.GC_DELETE_TIMEOUTS``: at most 2 x (5 + 10) s).
DELETING_STALE_MS = 45 * 1000


class Txn(Protocol):
    rowcount: int

    def execute(self, sql: str, args: Sequence[Any] = ...) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


def _add_column(txn: Txn, table: str, column: str, definition: str) -> None:
    if is_postgres(txn):
        txn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {definition}", ())
        return
    txn.execute(f"PRAGMA table_info({table})", ())
    if column not in {str(r[1]) for r in txn.fetchall()}:
        txn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}", ())


def _step_lifecycle(txn: Txn) -> None:
    """Version 2: claims, tombstones and the blob columns of the deletion lifecycle.

    ``gen`` changes with every change of a blob's references, so that a deletion can
    mark a blob only if nothing referenced it since it was chosen: one conditional
    UPDATE that PostgreSQL re-checks on the locked row (a subquery on another table
    would be judged on the statement's old snapshot). ``unref_ts`` is when the last
    reference went, the start of ``delete_after``.
    """
    _add_column(txn, BLOBS, "gen", "BIGINT NOT NULL DEFAULT 0")
    _add_column(txn, BLOBS, "unref_ts", "BIGINT")
    txn.execute(
        f"CREATE INDEX IF NOT EXISTS {BLOBS}_unref ON {BLOBS} (unref_ts)"
        " WHERE unref_ts IS NOT NULL",
        (),
    )
    txn.execute(
        f"""CREATE TABLE IF NOT EXISTS {CLAIMS} (
            token TEXT NOT NULL PRIMARY KEY,
            sha256 TEXT NOT NULL,
            path TEXT NOT NULL,
            instance TEXT NOT NULL,
            created_ts BIGINT NOT NULL
        )""",
        (),
    )
    txn.execute(f"CREATE INDEX IF NOT EXISTS {CLAIMS}_sha256 ON {CLAIMS} (sha256)", ())
    serial = "BIGSERIAL PRIMARY KEY" if is_postgres(txn) else "INTEGER PRIMARY KEY AUTOINCREMENT"
    txn.execute(
        f"""CREATE TABLE IF NOT EXISTS {TOMBSTONES} (
            id {serial},
            media_origin TEXT,
            file_id TEXT NOT NULL,
            thumbnail_width INTEGER,
            thumbnail_height INTEGER,
            thumbnail_type TEXT,
            thumbnail_method TEXT,
            deleted_ts BIGINT NOT NULL
        )""",
        (),
    )
    txn.execute(
        f"CREATE TABLE IF NOT EXISTS {STATE} (name TEXT NOT NULL PRIMARY KEY, value BIGINT)", ()
    )
    txn.execute(
        f"CREATE INDEX IF NOT EXISTS {PATHS}_file_id ON {PATHS} (file_id)", ()
    )


def _step_tombstone_media_id(txn: Txn) -> None:
    """Version 3: tombstones record Synapse's ``media_id``, so that the check "has
    Synapse still a row for this remote media?" uses its unique ``(media_origin,
    media_id)`` index instead of scanning every cached media of the origin for a
    ``filesystem_id`` (no index). NULL in tombstones written before."""
    _add_column(txn, TOMBSTONES, "media_id", "TEXT")


def _step_boots(txn: Txn) -> None:
    """Version 4: claims belong to a process's boot, not to its instance name.

    Two processes with one instance name can run at once (a rolling update with
    surge), so the name cannot tell a previous life's claims from a live process's.
    Each boot has a row refreshed by a heartbeat; claims of a boot whose heartbeat
    stopped are released (:func:`boot_heartbeat_txn`). Claims without a boot (older
    versions, the CLI) are left to ``gc``'s :data:`CLAIM_STALE_MS`.
    """
    _add_column(txn, CLAIMS, "boot", "TEXT")
    txn.execute(f"CREATE INDEX IF NOT EXISTS {CLAIMS}_boot ON {CLAIMS} (boot)", ())
    txn.execute(
        f"""CREATE TABLE IF NOT EXISTS {BOOTS} (
            boot TEXT NOT NULL PRIMARY KEY,
            instance TEXT NOT NULL,
            started_ts BIGINT NOT NULL,
            seen_ts BIGINT NOT NULL
        )""",
        (),
    )


def _step_leases(txn: Txn) -> None:
    """Version 5: leases, so that one media process at a time runs the deletion job.

    ``owner`` is a process's per-boot id, ``instance`` its Synapse instance name (for
    the log); times are the database's clock (see ``lease.py``).
    """
    txn.execute(
        f"""CREATE TABLE IF NOT EXISTS {LEASES} (
            name TEXT NOT NULL PRIMARY KEY,
            owner TEXT NOT NULL,
            instance TEXT NOT NULL,
            taken_ts BIGINT NOT NULL,
            renewed_ts BIGINT NOT NULL,
            expires_ts BIGINT NOT NULL
        )""",
        (),
    )


def _step_tool_runs(txn: Txn) -> None:
    """Version 7: one row per offline tool (``migrate``, ``scrub``, ``gc``): who runs it
    (``owner``, ``heartbeat_ts``), how far it got (``cursor``, a key of the tool's
    ordered walk, and ``done``/``stats`` so far), so that a killed run resumes there and
    a second run refuses while the first is alive (see ``storage/runs.py``)."""
    real = "DOUBLE PRECISION" if is_postgres(txn) else "REAL"
    txn.execute(
        f"""CREATE TABLE IF NOT EXISTS {TOOL_RUNS} (
            tool TEXT NOT NULL PRIMARY KEY,
            args TEXT NOT NULL,
            owner TEXT NOT NULL,
            cursor TEXT,
            done BIGINT NOT NULL DEFAULT 0,
            stats TEXT,
            started_ts BIGINT NOT NULL,
            heartbeat_ts BIGINT NOT NULL,
            finished_ts BIGINT,
            rate {real}
        )""",
        (),
    )


# The running totals ``stats`` reads: what ``COUNT``/``SUM`` over the paths and blobs
# would answer (a full scan took 5 s at 10^6 paths on PostgreSQL, see docs/benchmarks.md
# B7). Triggers on both tables append a row of changes to TOTALS in the transaction that
# changes them, so concurrent writers never wait for each other (no shared counter row
# to lock) and a rolled-back change rolls its totals back with it; the table is the sum
# of its rows, and :func:`compact_totals_txn` folds them into one now and then.
_TOTAL_COLUMNS = "paths, logical_bytes, objects, stored_bytes, corrupt_objects"
TOTALS_VERSION = 6  # the schema version that creates them
_TOTALS_TRIGGER_PATHS = "msc3916_storage_totals_paths"
_TOTALS_TRIGGER_BLOBS = "msc3916_storage_totals_blobs"


def _pg_totals_function(name: str, body: str) -> str:
    return (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $body$"
        " DECLARE n BIGINT := 0; b BIGINT := 0; o BIGINT := 0; s BIGINT := 0; c BIGINT := 0;"
        f" BEGIN {body}"
        " IF n <> 0 OR b <> 0 OR o <> 0 OR s <> 0 OR c <> 0 THEN"
        f" INSERT INTO {TOTALS} ({_TOTAL_COLUMNS}) VALUES (n, b, o, s, c); END IF;"
        " RETURN NULL; END $body$"
    )


_PG_TOTALS_PATHS = _pg_totals_function(
    _TOTALS_TRIGGER_PATHS,
    "IF TG_OP <> 'DELETE' THEN n := n + 1; b := b + NEW.length; END IF;"
    " IF TG_OP <> 'INSERT' THEN n := n - 1; b := b - OLD.length; END IF;",
)
_PG_TOTALS_BLOBS = _pg_totals_function(
    _TOTALS_TRIGGER_BLOBS,
    "IF TG_OP <> 'DELETE' THEN"
    "  IF NEW.stored = 1 THEN o := o + 1; s := s + NEW.length; END IF;"
    "  IF NEW.corrupt = 1 THEN c := c + 1; END IF; END IF;"
    " IF TG_OP <> 'INSERT' THEN"
    "  IF OLD.stored = 1 THEN o := o - 1; s := s - OLD.length; END IF;"
    "  IF OLD.corrupt = 1 THEN c := c - 1; END IF; END IF;",
)


def _sqlite_blob_totals(row: str, sign: str) -> str:
    return (
        f"{sign}({row}.stored = 1), {sign}(CASE WHEN {row}.stored = 1 THEN {row}.length ELSE 0 END),"
        f" {sign}({row}.corrupt = 1)"
    )


# SQLite has no trigger functions: one trigger per table and event.
_SQLITE_TOTALS_TRIGGERS = [
    (f"{_TOTALS_TRIGGER_PATHS}_insert", f"AFTER INSERT ON {PATHS}", "1, NEW.length, 0, 0, 0"),
    (f"{_TOTALS_TRIGGER_PATHS}_delete", f"AFTER DELETE ON {PATHS}", "-1, -OLD.length, 0, 0, 0"),
    (
        f"{_TOTALS_TRIGGER_PATHS}_update",
        f"AFTER UPDATE OF length ON {PATHS} WHEN NEW.length <> OLD.length",
        "0, NEW.length - OLD.length, 0, 0, 0",
    ),
    (
        f"{_TOTALS_TRIGGER_BLOBS}_insert",
        f"AFTER INSERT ON {BLOBS} WHEN NEW.stored = 1 OR NEW.corrupt = 1",
        "0, 0, " + _sqlite_blob_totals("NEW", "+"),
    ),
    (
        f"{_TOTALS_TRIGGER_BLOBS}_delete",
        f"AFTER DELETE ON {BLOBS} WHEN OLD.stored = 1 OR OLD.corrupt = 1",
        "0, 0, " + _sqlite_blob_totals("OLD", "-"),
    ),
    (
        f"{_TOTALS_TRIGGER_BLOBS}_update",
        f"AFTER UPDATE OF stored, corrupt, length ON {BLOBS} WHEN NEW.stored <> OLD.stored"
        " OR NEW.corrupt <> OLD.corrupt OR NEW.length <> OLD.length",
        "0, 0, (NEW.stored = 1) - (OLD.stored = 1),"
        " (CASE WHEN NEW.stored = 1 THEN NEW.length ELSE 0 END)"
        " - (CASE WHEN OLD.stored = 1 THEN OLD.length ELSE 0 END),"
        " (NEW.corrupt = 1) - (OLD.corrupt = 1)",
    ),
]


def count_totals_txn(txn: Txn) -> tuple[int, int, int, int, int]:
    """The totals by a full scan of both tables: (paths, logical bytes, objects, stored
    bytes, corrupt objects). What the running totals must always equal."""
    txn.execute(f"SELECT COUNT(*), COALESCE(SUM(length), 0) FROM {PATHS}", ())
    paths, logical = txn.fetchone()
    txn.execute(
        "SELECT COALESCE(SUM(CASE WHEN stored = 1 THEN 1 ELSE 0 END), 0),"
        " COALESCE(SUM(CASE WHEN stored = 1 THEN length ELSE 0 END), 0),"
        f" COALESCE(SUM(CASE WHEN corrupt = 1 THEN 1 ELSE 0 END), 0) FROM {BLOBS}",
        (),
    )
    objects, stored, corrupt = txn.fetchone()
    return int(paths), int(logical), int(objects), int(stored), int(corrupt)


def init_totals_txn(txn: Txn) -> None:
    """Version 6: running totals for ``stats``, kept by triggers, started from a scan.

    The scan and the triggers must see the same moment, or a change committed between
    them would be counted twice or never. On PostgreSQL the step therefore locks both
    tables against writers first (writers in flight finish, new ones wait until this
    transaction commits) and must run at READ COMMITTED, so that the scan, a statement
    after the lock, sees every change committed before it (at REPEATABLE READ it would
    see the snapshot taken when the transaction began). SQLite: this transaction holds
    the database's write lock from its first write, so nothing changes meanwhile.
    Whatever the table held before (a step run twice) is replaced by the scan.
    """
    txn.execute(
        f"CREATE TABLE IF NOT EXISTS {TOTALS} (paths BIGINT NOT NULL, logical_bytes BIGINT"
        " NOT NULL, objects BIGINT NOT NULL, stored_bytes BIGINT NOT NULL,"
        " corrupt_objects BIGINT NOT NULL)",
        (),
    )
    if is_postgres(txn):
        txn.execute("SELECT current_setting('transaction_isolation')", ())
        isolation = str(txn.fetchone()[0])
        if isolation != "read committed":
            raise RuntimeError(
                f"the storage index's totals step needs READ COMMITTED, not {isolation}"
            )
        txn.execute(f"LOCK TABLE {PATHS}, {BLOBS} IN SHARE ROW EXCLUSIVE MODE", ())
        for function, table in ((_PG_TOTALS_PATHS, PATHS), (_PG_TOTALS_BLOBS, BLOBS)):
            name = _TOTALS_TRIGGER_PATHS if table == PATHS else _TOTALS_TRIGGER_BLOBS
            txn.execute(function, ())
            txn.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}", ())
            txn.execute(
                f"CREATE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE ON {table}"
                f" FOR EACH ROW EXECUTE PROCEDURE {name}()",
                (),
            )
    else:
        for name, when, values in _SQLITE_TOTALS_TRIGGERS:
            txn.execute(f"DROP TRIGGER IF EXISTS {name}", ())
            txn.execute(
                f"CREATE TRIGGER {name} {when} BEGIN INSERT INTO {TOTALS}"
                f" ({_TOTAL_COLUMNS}) VALUES ({values}); END",
                (),
            )
    txn.execute(f"DELETE FROM {TOTALS}", ())
    txn.execute(
        f"INSERT INTO {TOTALS} ({_TOTAL_COLUMNS}) VALUES (?, ?, ?, ?, ?)", count_totals_txn(txn)
    )


def totals_txn(txn: Txn) -> tuple[int, int, int, int, int]:
    """The running totals, in :func:`count_totals_txn`'s order, without a scan."""
    txn.execute(
        "SELECT COALESCE(SUM(paths), 0), COALESCE(SUM(logical_bytes), 0),"
        " COALESCE(SUM(objects), 0), COALESCE(SUM(stored_bytes), 0),"
        f" COALESCE(SUM(corrupt_objects), 0) FROM {TOTALS}",
        (),
    )
    row = txn.fetchone()
    return int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4])


def compact_totals_txn(txn: Txn) -> int:
    """Fold the totals' change rows into one row; returns how many rows were folded.

    Exact with concurrent writers and compactors: on PostgreSQL one statement deletes
    the rows it sums (rows not yet committed are not seen and stay; a row another
    compactor deleted first is skipped, at READ COMMITTED), on SQLite the transaction
    holds the write lock. Cheap when there is nothing to fold.
    """
    txn.execute(f"SELECT COUNT(*) FROM {TOTALS}", ())
    if int(txn.fetchone()[0]) < 2:
        return 0
    sums = (
        "COALESCE(SUM(paths), 0), COALESCE(SUM(logical_bytes), 0), COALESCE(SUM(objects), 0),"
        " COALESCE(SUM(stored_bytes), 0), COALESCE(SUM(corrupt_objects), 0)"
    )
    if is_postgres(txn):
        txn.execute(
            f"WITH gone AS (DELETE FROM {TOTALS} RETURNING *),"
            f" folded AS (INSERT INTO {TOTALS} ({_TOTAL_COLUMNS}) SELECT {sums} FROM gone"
            " HAVING COUNT(*) > 0) SELECT COUNT(*) FROM gone",
            (),
        )
        return int(txn.fetchone()[0])
    txn.execute(f"DELETE FROM {TOTALS} WHERE 1 = 0", ())  # takes the write lock before reading
    txn.execute(f"SELECT COUNT(*), {sums} FROM {TOTALS}", ())
    count, *totals = txn.fetchone()
    txn.execute(f"DELETE FROM {TOTALS}", ())
    txn.execute(f"INSERT INTO {TOTALS} ({_TOTAL_COLUMNS}) VALUES (?, ?, ?, ?, ?)", totals)
    return int(count)


# Each step is idempotent (IF NOT EXISTS) so that two processes upgrading at the same
# moment both succeed; the version row then only records how far the schema has got.
_STEPS: list[tuple[int, list[Any]]] = [
    (
        1,
        [
            f"""CREATE TABLE IF NOT EXISTS {BLOBS} (
                sha256 TEXT NOT NULL PRIMARY KEY,
                length BIGINT NOT NULL,
                stored SMALLINT NOT NULL DEFAULT 0,
                corrupt SMALLINT NOT NULL DEFAULT 0,
                deleting_ts BIGINT,
                created_ts BIGINT NOT NULL,
                last_ref_ts BIGINT NOT NULL
            )""",
            f"""CREATE TABLE IF NOT EXISTS {PATHS} (
                path TEXT NOT NULL PRIMARY KEY,
                sha256 TEXT NOT NULL,
                length BIGINT NOT NULL,
                media_origin TEXT,
                file_id TEXT NOT NULL,
                thumbnail_width INTEGER,
                thumbnail_height INTEGER,
                thumbnail_type TEXT,
                thumbnail_method TEXT,
                created_ts BIGINT NOT NULL
            )""",
            f"CREATE INDEX IF NOT EXISTS {PATHS}_sha256 ON {PATHS} (sha256)",
        ],
    ),
    (2, [_step_lifecycle]),
    (3, [_step_tombstone_media_id]),
    (4, [_step_boots]),
    (5, [_step_leases]),
    (TOTALS_VERSION, [init_totals_txn]),
    (7, [_step_tool_runs]),
]
SCHEMA_VERSION = _STEPS[-1][0]


def now_ms() -> int:
    return int(time.time() * 1000)


def db_now_sql(txn: Any) -> str:
    """SQL for the database's current time in ms: the one clock every process shares.

    Deletion marks and boot heartbeats are judged by it, so that processes whose clocks
    differ never take a live mark for a dead one (PostgreSQL's ``clock_timestamp()``,
    not ``now()``, which is the transaction's start).
    """
    if is_postgres(txn):
        return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    # Rounded, not truncated: julianday's float is a hair below the whole ms it holds,
    # which made this clock run up to 1 ms behind time.time() on the same machine.
    return "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)"


# Any fixed number: the key of the advisory lock that serialises schema changes.
_SCHEMA_LOCK_KEY = 0x3916_5700


def is_postgres(txn: Any) -> bool:
    """Whether ``txn`` talks to PostgreSQL (a Synapse ``LoggingTransaction`` or a ToolTxn)."""
    if getattr(txn, "engine", None) == "postgres":
        return True
    engine = getattr(txn, "database_engine", None)
    return type(engine).__name__.startswith("Postgres")


def schema_lock_txn(txn: Txn) -> None:
    """Serialise schema (and trigger) changes between processes starting at once."""
    if is_postgres(txn):
        txn.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK_KEY,))


def ensure_schema_txn(txn: Txn) -> int:
    """Create or upgrade the index tables in place; return the schema version.

    On PostgreSQL two sessions running the same ``CREATE TABLE IF NOT EXISTS`` at once
    can both pass the existence check and one then fails on a catalogue unique index
    (seen with eight concurrent starters); a transaction-scoped advisory lock makes
    concurrent starters (main process and workers) take turns instead. SQLite
    serialises writers by itself.
    """
    schema_lock_txn(txn)
    txn.execute(
        f"CREATE TABLE IF NOT EXISTS {SCHEMA} ("
        " component TEXT NOT NULL PRIMARY KEY, version INTEGER NOT NULL)",
        (),
    )
    txn.execute(
        f"INSERT INTO {SCHEMA} (component, version) VALUES (?, 0)"
        " ON CONFLICT (component) DO NOTHING",
        (SCHEMA_COMPONENT,),
    )
    txn.execute(f"SELECT version FROM {SCHEMA} WHERE component = ?", (SCHEMA_COMPONENT,))
    current = int(txn.fetchone()[0])
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"the storage index schema is version {current}, newer than this code"
            f" ({SCHEMA_VERSION}); upgrade synapse-msc3916"
        )
    for version, statements in _STEPS:
        if version <= current:
            continue
        for step in statements:
            if callable(step):
                step(txn)
            else:
                txn.execute(step, ())
        txn.execute(
            f"UPDATE {SCHEMA} SET version = ? WHERE component = ? AND version < ?",
            (version, SCHEMA_COMPONENT, version),
        )
    return SCHEMA_VERSION


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MediaRef:
    """What a stored path is, in terms of Synapse's media tables."""

    media_origin: str | None  # None for local media
    file_id: str  # media_id (local) or filesystem_id (remote)
    thumbnail_width: int | None = None
    thumbnail_height: int | None = None
    thumbnail_type: str | None = None
    thumbnail_method: str | None = None


def parse_media_path(path: str) -> MediaRef | None:
    """Recover what Synapse's ``MediaFilePaths`` encoded in a relative path.

    Used for objects the provider did not see being stored (a legacy bucket, an
    existing media store), where no ``FileInfo`` is at hand. ``None`` for paths that
    are not media Synapse keeps (``url_cache``) or that do not parse.
    """
    parts = path.strip("/").split("/")
    if not parts:
        return None
    kind = parts[0]
    origin: str | None = None
    if kind in ("remote_content", "remote_thumbnail"):
        if len(parts) < 2:
            return None
        origin = parts[1]
        parts = parts[2:]
    elif kind in ("local_content", "local_thumbnails"):
        parts = parts[1:]
    else:
        return None
    thumbnail = kind in ("local_thumbnails", "remote_thumbnail")
    if len(parts) != (4 if thumbnail else 3) or not all(parts):
        return None
    file_id = "".join(parts[:3])
    if not thumbnail:
        return MediaRef(origin, file_id)
    fields = parts[3].split("-")
    if len(fields) < 5 or not fields[0].isdigit() or not fields[1].isdigit():
        return None
    media_type = fields[2] + "/" + "-".join(fields[3:-1])
    return MediaRef(origin, file_id, int(fields[0]), int(fields[1]), media_type, fields[-1])


# --- store -------------------------------------------------------------------

WRITE, HIT, WAIT = "write", "hit", "wait"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Claim:
    """An upload's reference on a blob, held from its claim until its path is recorded.

    While a claim row exists no deletion can mark the blob, however long the upload
    takes: the protection of an upload in flight is this row, not a grace period.
    ``boot`` is the process's boot (see :func:`boot_heartbeat_txn`): its claims are
    released once its heartbeat stops; ``instance`` is only for people reading the row.
    """

    token: str
    path: str
    instance: str
    boot: str | None = None


class LostClaim(RuntimeError):
    """An upload's claim is no longer held (released behind its back by a stale-claim
    cleanup), or its blob is gone or being deleted: the object may be deleted, so the
    upload must fail rather than be acknowledged."""


def _lock(txn: Txn) -> str:
    return " FOR UPDATE" if is_postgres(txn) else ""


def claim_blob_txn(
    txn: Txn, sha256: str, length: int, now: int, claim: Claim | None = None
) -> tuple[str, bool]:
    """Take a reference on a blob before its object is (maybe) written.

    Returns (decision, overwrite): ``hit`` when the object is known to be stored and
    sound, ``write`` when this caller must write it (``overwrite`` when the existing
    object is known corrupt), ``wait`` while a deletion is deleting the object (no
    reference is taken then). With ``claim``, the reference is a claim row that only
    :func:`record_path_txn` or :func:`release_claim_txn` removes.

    Race-free by protocol: the row is read under a row lock on PostgreSQL and changed
    by a compare-and-swap on ``gen``, so a deletion that marked the blob after the read
    makes this claim start again instead of being overwritten (the bug where an upload
    became a dedup hit on an object a ``gc`` was deleting).
    """
    while True:
        txn.execute(
            f"SELECT stored, corrupt, deleting_ts, gen, {db_now_sql(txn)} FROM {BLOBS}"
            f" WHERE sha256 = ?{_lock(txn)}",
            (sha256,),
        )
        row = txn.fetchone()
        if row is None:
            txn.execute(
                f"INSERT INTO {BLOBS} (sha256, length, stored, corrupt, created_ts, last_ref_ts)"
                " VALUES (?, ?, 0, 0, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                (sha256, length, now, now),
            )
            if txn.rowcount == 1:
                _insert_claim(txn, sha256, claim, now)
                return WRITE, False
            continue  # lost a race with another inserter: decide again on its row
        stored, corrupt, deleting_ts, gen, db_now = row
        if deleting_ts is not None and int(db_now) - int(deleting_ts) < DELETING_STALE_MS:
            return WAIT, False
        txn.execute(
            f"UPDATE {BLOBS} SET last_ref_ts = ?, deleting_ts = NULL, unref_ts = NULL,"
            " gen = gen + 1 WHERE sha256 = ? AND gen = ?",
            (now, sha256, gen),
        )
        if txn.rowcount != 1:
            continue  # changed since the read (a deletion marked or finished): again
        _insert_claim(txn, sha256, claim, now)
        if deleting_ts is not None:
            # A deletion died half-way; its object may or may not be gone.
            return WRITE, True
        if stored and not corrupt:
            return HIT, False
        return WRITE, bool(corrupt)


def _insert_claim(txn: Txn, sha256: str, claim: Claim | None, now: int) -> None:
    if claim is None:
        return
    txn.execute(
        f"INSERT INTO {CLAIMS} (token, sha256, path, instance, boot, created_ts)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (claim.token, sha256, claim.path, claim.instance, claim.boot, now),
    )


def _mark_unreferenced_txn(txn: Txn, sha256s: Sequence[str], now: int) -> int:
    """Start ``delete_after`` for the blobs among ``sha256s`` that nothing references."""
    marked = 0
    for sha256 in sorted(set(sha256s)):
        txn.execute(
            f"UPDATE {BLOBS} SET unref_ts = ? WHERE sha256 = ? AND unref_ts IS NULL"
            f" AND NOT EXISTS (SELECT 1 FROM {PATHS} p WHERE p.sha256 = ?)"
            f" AND NOT EXISTS (SELECT 1 FROM {CLAIMS} c WHERE c.sha256 = ?)",
            (now, sha256, sha256, sha256),
        )
        marked += max(txn.rowcount, 0)
    return marked


def _release_claims_txn(txn: Txn, tokens: Sequence[str], now: int) -> int:
    """Drop the claims among ``tokens`` that still exist; their blobs may be garbage now."""
    shas = []
    for token in tokens:
        txn.execute(f"SELECT sha256 FROM {CLAIMS} WHERE token = ?", (token,))
        row = txn.fetchone()
        if row is None:
            continue
        txn.execute(f"DELETE FROM {CLAIMS} WHERE token = ?", (token,))
        if txn.rowcount == 1:  # not recorded or released by someone else meanwhile
            shas.append(str(row[0]))
    _mark_unreferenced_txn(txn, shas, now)
    return len(shas)


def release_claim_txn(txn: Txn, token: str, now: int) -> None:
    """An upload failed after claiming: drop its reference (the blob may now be garbage)."""
    _release_claims_txn(txn, [token], now)


def boot_heartbeat_txn(txn: Txn, boot: str, instance: str) -> int:
    """This process (``boot``) is alive; release the claims of boots that are not.

    Run at start-up and every :data:`BOOT_HEARTBEAT_MS`. A boot is dead once its row was
    not refreshed for :data:`BOOT_STALE_MS` by the database's clock. A boot is a
    process's life, not its instance name: a process starting while another with the
    same name still runs (a surge) leaves that one's claims alone, and a restarted
    process's previous life is released once its heartbeat is stale. Releasing a live
    process's claim by mistake (one stalled that long) costs that process its uploads in
    flight (``record_path_txn`` refuses them), never acknowledged bytes. A boot whose
    row was removed gets it back with its next beat. Returns the claims released.
    """
    now_sql = db_now_sql(txn)
    txn.execute(
        f"INSERT INTO {BOOTS} (boot, instance, started_ts, seen_ts)"
        f" VALUES (?, ?, {now_sql}, {now_sql})"
        " ON CONFLICT (boot) DO UPDATE SET seen_ts = excluded.seen_ts",
        (boot, instance),
    )
    return _release_dead_boots_txn(txn, now_ms())


def _release_dead_boots_txn(txn: Txn, now: int) -> int:
    stale = f"seen_ts < {db_now_sql(txn)} - ?"
    txn.execute(f"SELECT boot FROM {BOOTS} WHERE {stale} ORDER BY boot", (BOOT_STALE_MS,))
    released = 0
    for (boot,) in txn.fetchall():
        # Re-checked on the row: a boot that beat again meanwhile keeps its claims.
        txn.execute(f"DELETE FROM {BOOTS} WHERE boot = ? AND {stale}", (boot, BOOT_STALE_MS))
        if txn.rowcount != 1:
            continue
        txn.execute(f"SELECT token FROM {CLAIMS} WHERE boot = ? ORDER BY token", (boot,))
        released += _release_claims_txn(txn, [str(r[0]) for r in txn.fetchall()], now)
    return released


def release_stale_claims_txn(txn: Txn, now: int) -> int:
    """Release claims no upload holds any more (what ``gc`` does): those of dead boots,
    and any older than :data:`CLAIM_STALE_MS` (a CLI crash, a claim of no known boot)."""
    released = _release_dead_boots_txn(txn, now)
    txn.execute(
        f"SELECT token FROM {CLAIMS} WHERE created_ts < ? ORDER BY token",
        (now - CLAIM_STALE_MS,),
    )
    return released + _release_claims_txn(txn, [str(r[0]) for r in txn.fetchall()], now)


_INSERT_PATH = (
    f"INSERT INTO {PATHS} (path, sha256, length, media_origin, file_id,"
    " thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method, created_ts)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _path_row(path: str, sha256: str, length: int, ref: MediaRef, now: int) -> tuple[Any, ...]:
    return (
        path, sha256, length, ref.media_origin, ref.file_id, ref.thumbnail_width,
        ref.thumbnail_height, ref.thumbnail_type, ref.thumbnail_method, now,
    )


def record_path_txn(
    txn: Txn,
    path: str,
    sha256: str,
    length: int,
    ref: MediaRef,
    now: int,
    stored: bool,
    claim: Claim | None = None,
) -> None:
    """Point ``path`` at ``sha256``; ``stored`` also records that the object now exists.

    With ``claim``, the path row replaces the claim in the same transaction, so the
    blob is referenced without a gap. Raises :class:`LostClaim` (the upload must then
    fail rather than acknowledge bytes that may be deleted) unless the claim was still
    held (its ``DELETE`` removed exactly one row: nobody released it) and the blob row
    exists and is not marked for deletion. The claim goes first, as in every cleanup
    (claims, then blobs), so that PostgreSQL row locks are always taken in one order.
    """
    if claim is not None:
        txn.execute(f"DELETE FROM {CLAIMS} WHERE token = ?", (claim.token,))
        if txn.rowcount != 1:
            raise LostClaim(f"the claim of {path} on {sha256} was released while it was stored")
    txn.execute(
        f"UPDATE {BLOBS} SET "
        + ("stored = 1, corrupt = 0, " if stored else "")
        + "last_ref_ts = ?, unref_ts = NULL, gen = gen + 1"
        " WHERE sha256 = ? AND deleting_ts IS NULL",
        (now, sha256),
    )
    if txn.rowcount != 1:
        raise LostClaim(f"the blob {sha256} was deleted (or is being deleted) while {path} was stored")
    txn.execute(f"SELECT sha256 FROM {PATHS} WHERE path = ?", (path,))
    previous = txn.fetchone()
    txn.execute(
        _INSERT_PATH + " ON CONFLICT (path) DO UPDATE SET sha256 = excluded.sha256,"
        " length = excluded.length, created_ts = excluded.created_ts",
        _path_row(path, sha256, length, ref, now),
    )
    if previous is not None and str(previous[0]) != sha256:
        # The path was re-stored with other bytes: the old content may be garbage now.
        _mark_unreferenced_txn(txn, [str(previous[0])], now)


def record_path_if_absent_txn(
    txn: Txn, path: str, sha256: str, length: int, ref: MediaRef, now: int, claim: Claim
) -> bool:
    """:func:`record_path_txn` for a path nobody has recorded yet; False (and the claim
    released) when someone has.

    What ``migrate`` records a local file with: Synapse writes media in place, so a
    path the provider recorded meanwhile holds the complete content, which a reading
    of the file on disk must never replace. The insert is the check (``DO NOTHING`` on
    the path's key), so a provider recording at the same moment wins either way.
    """
    txn.execute(
        _INSERT_PATH + " ON CONFLICT (path) DO NOTHING",
        _path_row(path, sha256, length, ref, now),
    )
    if txn.rowcount != 1:
        release_claim_txn(txn, claim.token, now)
        return False
    record_path_txn(txn, path, sha256, length, ref, now, True, claim)
    return True


def synapse_length_txn(txn: Txn, ref: MediaRef) -> int | None:
    """The length Synapse recorded for a local media file or thumbnail; None without a
    row. (Remote ones: :func:`remote_rows_page_txn`, a lookup by ``filesystem_id`` has no
    index.)

    Synapse inserts the row only once the file is complete, so a file of another
    length is still being written (or damaged): ``migrate`` leaves it alone.
    """
    assert ref.media_origin is None
    if ref.thumbnail_width is None:
        txn.execute(
            "SELECT media_length FROM local_media_repository WHERE media_id = ?", (ref.file_id,)
        )
    else:
        txn.execute(
            "SELECT thumbnail_length FROM local_media_repository_thumbnails"
            " WHERE media_id = ? AND thumbnail_width = ? AND thumbnail_height = ?"
            " AND thumbnail_type = ? AND thumbnail_method = ?",
            (ref.file_id, ref.thumbnail_width, ref.thumbnail_height, ref.thumbnail_type,
             ref.thumbnail_method),
        )
    row = txn.fetchone()
    return None if row is None or row[0] is None else int(row[0])


def remote_rows_page_txn(
    txn: Txn, origin: str, thumbnails: bool, with_sha256: bool, start: str, limit: int
) -> list[tuple[Any, tuple[int | None, str | None]]]:
    """Synapse's rows of one origin's remote media (or thumbnails) from ``filesystem_id``
    ``start`` on, in ``filesystem_id`` order, at most ``limit`` (``limit`` 0: only those
    of ``start`` itself, all of them): each keyed as a path names it, ``filesystem_id``
    (plus the thumbnail's dimensions, type and method), with (length, SHA-256).

    Synapse indexes ``(media_origin, media_id)``, not ``filesystem_id``: each page is one
    pass over the origin's range of that index, sorted, which is why pages are large."""
    where = "media_origin = ? AND filesystem_id = ?" if limit == 0 else (
        "media_origin = ? AND filesystem_id >= ?"
    )
    tail = "" if limit == 0 else f" ORDER BY filesystem_id LIMIT {int(limit)}"
    if thumbnails:
        txn.execute(
            "SELECT filesystem_id, thumbnail_width, thumbnail_height, thumbnail_type,"
            f" thumbnail_method, thumbnail_length FROM remote_media_cache_thumbnails WHERE {where}"
            + tail,
            (origin, start),
        )
        return [
            ((str(r[0]), r[1], r[2], r[3], r[4]), (None if r[5] is None else int(r[5]), None))
            for r in txn.fetchall()
        ]
    sha = "sha256" if with_sha256 else "NULL"
    txn.execute(
        f"SELECT filesystem_id, media_length, {sha} FROM remote_media_cache WHERE {where}"
        + tail,
        (origin, start),
    )
    return [
        (str(r[0]), (None if r[1] is None else int(r[1]), None if r[2] is None else str(r[2])))
        for r in txn.fetchall()
    ]


def synapse_sha256_txn(txn: Txn, ref: MediaRef) -> tuple[str, int] | None:
    """The SHA-256 and length Synapse itself recorded for an original, if any.

    Synapse 1.163 fills ``sha256`` on ``local_media_repository`` and
    ``remote_media_cache`` (schema delta 91/01) when it writes the row, which is after
    the providers have stored the file; so this helps re-stores and migrations, not
    first uploads.
    """
    if ref.thumbnail_width is not None:
        return None
    if ref.media_origin is None:
        txn.execute(
            "SELECT sha256, media_length FROM local_media_repository WHERE media_id = ?",
            (ref.file_id,),
        )
    else:
        txn.execute(
            "SELECT sha256, media_length FROM remote_media_cache"
            " WHERE media_origin = ? AND filesystem_id = ?",
            (ref.media_origin, ref.file_id),
        )
    row = txn.fetchone()
    if row is None or not row[0] or row[1] is None:
        return None
    return str(row[0]), int(row[1])


# --- fetch -------------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Located:
    sha256: str
    length: int
    servable: bool  # stored, not corrupt, not being deleted


def locate_txn(txn: Txn, path: str) -> Located | None:
    txn.execute(
        f"SELECT p.sha256, p.length, b.stored, b.corrupt, b.deleting_ts"
        f" FROM {PATHS} p LEFT JOIN {BLOBS} b ON b.sha256 = p.sha256 WHERE p.path = ?",
        (path,),
    )
    row = txn.fetchone()
    if row is None:
        return None
    sha256, length, stored, corrupt, deleting_ts = row
    servable = bool(stored) and not corrupt and deleting_ts is None
    return Located(str(sha256), int(length), servable)


def mark_corrupt_txn(txn: Txn, sha256: str) -> None:
    txn.execute(f"UPDATE {BLOBS} SET corrupt = 1 WHERE sha256 = ?", (sha256,))


def mark_blob_missing_txn(txn: Txn, sha256: str) -> bool:
    """Record that a blob's object was found missing (or damaged) although the row says
    it is stored; True if this call changed the row.

    Self-healing relies on this one conditional statement and nothing else: it sets the
    same ``corrupt`` flag a failed verification sets, which the store path already
    reads (``claim_blob_txn`` answers ``write`` with ``overwrite``), so the next store of
    the same content rewrites the object instead of being a dedup hit on nothing, and
    ``record_path_txn`` clears the flag once it has. A row being deleted is left alone:
    its object is meant to vanish.
    """
    txn.execute(
        f"UPDATE {BLOBS} SET corrupt = 1"
        " WHERE sha256 = ? AND corrupt = 0 AND deleting_ts IS NULL",
        (sha256,),
    )
    return txn.rowcount == 1


def claim_for_copy_txn(
    txn: Txn, sha256: str, length: int, now: int, claim: Claim
) -> tuple[str, bool, bool]:
    """``claim_blob_txn`` for a writer about to put bytes it has not verified under
    ``sha256`` (a server-side copy, checked only once written): (decision, overwrite,
    may write unverified).

    Such a write is allowed only where it can wrong nobody: the object is new (no
    overwrite), nobody else claims the content (no upload in flight that could find the
    unverified object in place and trust it), and the blob is marked corrupt in the same
    transaction, so that every later store of the content overwrites the object with
    bytes it hashed (also after this process died before verifying), and a later copy
    of it is refused. ``record_path_txn`` clears the mark once the copy is verified.
    Otherwise the caller stores the content the ordinary way, under the claim it holds.
    """
    decision, overwrite = claim_blob_txn(txn, sha256, length, now, claim)
    if decision != WRITE or overwrite:
        return decision, overwrite, False
    txn.execute(
        f"SELECT COUNT(*) FROM {CLAIMS} WHERE sha256 = ? AND token <> ?", (sha256, claim.token)
    )
    if int(txn.fetchone()[0]):
        return decision, overwrite, False
    txn.execute(
        f"UPDATE {BLOBS} SET corrupt = 1, gen = gen + 1 WHERE sha256 = ? AND deleting_ts IS NULL",
        (sha256,),
    )
    return decision, overwrite, txn.rowcount == 1


def blob_gen_txn(txn: Txn, sha256: str) -> int | None:
    """A blob row's ``gen`` (what a deletion's mark compares), None without a row."""
    txn.execute(f"SELECT gen FROM {BLOBS} WHERE sha256 = ?", (sha256,))
    row = txn.fetchone()
    return None if row is None else int(row[0])


def lost_object_txn(txn: Txn, sha256: str, now: int) -> int:
    """A deletion that lost its mark to an upload found the object gone afterwards: its
    delete landed after the upload wrote it. Mark the blob missing (the next store
    rewrites it, reads do not trust it), and release the claims on it, so that an upload
    that wrote the object but has not recorded its path yet fails instead of being
    acknowledged (``record_path_txn`` would otherwise clear the mark). Returns the
    claims released.
    """
    txn.execute(
        f"UPDATE {BLOBS} SET corrupt = 1, gen = gen + 1 WHERE sha256 = ? AND deleting_ts IS NULL",
        (sha256,),
    )
    txn.execute(f"SELECT token FROM {CLAIMS} WHERE sha256 = ? ORDER BY token", (sha256,))
    return _release_claims_txn(txn, [str(r[0]) for r in txn.fetchall()], now)


# --- deletion lifecycle and garbage collection ---------------------------------------

# A path row whose media (or thumbnail) row Synapse no longer has; ``p`` is the path.
_NO_MEDIA_ROW = (
    # local originals
    " ((p.media_origin IS NULL AND p.thumbnail_width IS NULL AND NOT EXISTS ("
    "   SELECT 1 FROM local_media_repository m WHERE m.media_id = p.file_id))"
    # remote originals
    " OR (p.media_origin IS NOT NULL AND p.thumbnail_width IS NULL AND NOT EXISTS ("
    "   SELECT 1 FROM remote_media_cache m"
    "   WHERE m.media_origin = p.media_origin AND m.filesystem_id = p.file_id))"
    # local thumbnails
    " OR (p.media_origin IS NULL AND p.thumbnail_width IS NOT NULL AND NOT EXISTS ("
    "   SELECT 1 FROM local_media_repository_thumbnails t"
    "   WHERE t.media_id = p.file_id AND t.thumbnail_width = p.thumbnail_width"
    "   AND t.thumbnail_height = p.thumbnail_height"
    "   AND t.thumbnail_type = p.thumbnail_type"
    "   AND t.thumbnail_method = p.thumbnail_method))"
    # remote thumbnails
    " OR (p.media_origin IS NOT NULL AND p.thumbnail_width IS NOT NULL AND NOT EXISTS ("
    "   SELECT 1 FROM remote_media_cache_thumbnails t"
    "   WHERE t.media_origin = p.media_origin AND t.filesystem_id = p.file_id"
    "   AND t.thumbnail_width = p.thumbnail_width"
    "   AND t.thumbnail_height = p.thumbnail_height"
    "   AND t.thumbnail_type = p.thumbnail_type"
    "   AND t.thumbnail_method = p.thumbnail_method)))"
)

# The remote half of ``_NO_MEDIA_ROW`` for a tombstone that knows the media id: two
# lookups on Synapse's unique (media_origin, media_id[, thumbnail...]) indexes. Takes
# (origin, media_id) twice.
_NO_REMOTE_ROW_BY_MEDIA_ID = (
    " ((p.thumbnail_width IS NULL AND NOT EXISTS ("
    "   SELECT 1 FROM remote_media_cache m WHERE m.media_origin = ? AND m.media_id = ?"
    "   AND m.filesystem_id = p.file_id))"
    " OR (p.thumbnail_width IS NOT NULL AND NOT EXISTS ("
    "   SELECT 1 FROM remote_media_cache_thumbnails t"
    "   WHERE t.media_origin = ? AND t.media_id = ? AND t.filesystem_id = p.file_id"
    "   AND t.thumbnail_width = p.thumbnail_width"
    "   AND t.thumbnail_height = p.thumbnail_height"
    "   AND t.thumbnail_type = p.thumbnail_type"
    "   AND t.thumbnail_method = p.thumbnail_method)))"
)

_UNREFERENCED = (
    f" NOT EXISTS (SELECT 1 FROM {PATHS} p WHERE p.sha256 = b.sha256)"
    f" AND NOT EXISTS (SELECT 1 FROM {CLAIMS} c WHERE c.sha256 = b.sha256)"
)


def note_tombstones_since_txn(txn: Txn, now: int) -> int:
    """Record (once) when the deletion triggers first existed; return that instant.

    Paths indexed before it may have lost their media without a tombstone; paths
    indexed after it cannot, which is what lets ``gc`` trust tombstones.
    """
    txn.execute(
        f"INSERT INTO {STATE} (name, value) VALUES ('tombstones_since', ?)"
        " ON CONFLICT (name) DO NOTHING",
        (now,),
    )
    since = tombstones_since_txn(txn)
    assert since is not None
    return since


def tombstones_since_txn(txn: Txn) -> int | None:
    txn.execute(f"SELECT value FROM {STATE} WHERE name = 'tombstones_since'", ())
    row = txn.fetchone()
    return None if row is None else int(row[0])


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TombstoneBatch:
    tombstones: int
    paths_removed: int
    blobs_unreferenced: int


def apply_tombstones_txn(txn: Txn, now: int, limit: int = 100) -> TombstoneBatch:
    """Turn up to ``limit`` tombstones into removed paths, oldest first.

    A tombstone of an original stands for the media and its thumbnails (Synapse
    deletes their files together); one of a thumbnail for that thumbnail. A path is
    removed only if Synapse has no row for it *now*, so a row deleted and written
    again (an upsert emulated as delete + insert) never loses its path. Blobs left
    without any reference start their ``delete_after``.
    """
    rows = _tombstones(txn, 0, limit)
    removed = 0
    shas: list[str] = []
    for row in rows:
        for path, sha256 in _tombstone_paths(txn, row):
            txn.execute(f"DELETE FROM {PATHS} WHERE path = ? AND sha256 = ?", (path, sha256))
            if txn.rowcount == 1:
                removed += 1
                shas.append(str(sha256))
        txn.execute(f"DELETE FROM {TOMBSTONES} WHERE id = ?", (row[0],))
    unreferenced = _mark_unreferenced_txn(txn, shas, now)
    return TombstoneBatch(len(rows), removed, unreferenced)


def _tombstones(txn: Txn, after: int, limit: int) -> list[Any]:
    txn.execute(
        f"SELECT id, media_origin, file_id, thumbnail_width, thumbnail_height, thumbnail_type,"
        f" thumbnail_method, media_id FROM {TOMBSTONES} WHERE id > ? ORDER BY id LIMIT ?",
        (after, limit),
    )
    return txn.fetchall()


def _tombstone_paths(txn: Txn, row: Any) -> list[tuple[str, str]]:
    """(path, sha256) of the paths a tombstone removes: its media's, if Synapse has no
    row for them now."""
    _tid, origin, file_id, width, height, ttype, tmethod, media_id = row
    where = "p.file_id = ? AND " + ("p.media_origin IS NULL" if origin is None else "p.media_origin = ?")
    args: list[Any] = [file_id] if origin is None else [file_id, origin]
    if width is not None:
        where += (
            " AND p.thumbnail_width = ? AND p.thumbnail_height = ?"
            " AND p.thumbnail_type = ? AND p.thumbnail_method = ?"
        )
        args += [width, height, ttype, tmethod]
    no_row = _NO_MEDIA_ROW
    if origin is not None and media_id is not None:
        no_row = _NO_REMOTE_ROW_BY_MEDIA_ID
        args += [origin, media_id, origin, media_id]
    txn.execute(f"SELECT p.path, p.sha256 FROM {PATHS} p WHERE {where} AND {no_row}", args)
    return [(str(path), str(sha256)) for path, sha256 in txn.fetchall()]


def tombstone_paths_page_txn(
    txn: Txn, after: int, limit: int
) -> tuple[int, int, list[tuple[str, str]]]:
    """Read-only: (last tombstone id, tombstones read, their (path, sha256) that
    :func:`apply_tombstones_txn` would remove), for ``gc``'s dry run."""
    rows = _tombstones(txn, after, limit)
    paths = [found for row in rows for found in _tombstone_paths(txn, row)]
    return (int(rows[-1][0]) if rows else after), len(rows), paths


def stale_claims_txn(txn: Txn, now: int) -> list[tuple[str, str]]:
    """Read-only: (token, sha256) of the claims ``gc`` releases
    (:func:`release_stale_claims_txn`: those of dead boots, and any older than
    :data:`CLAIM_STALE_MS`)."""
    txn.execute(
        f"SELECT token, sha256 FROM {CLAIMS} WHERE created_ts < ?"
        f" OR boot IN (SELECT boot FROM {BOOTS} WHERE seen_ts < {db_now_sql(txn)} - ?)",
        (now - CLAIM_STALE_MS, BOOT_STALE_MS),
    )
    return [(str(r[0]), str(r[1])) for r in txn.fetchall()]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class BlobRefs:
    paths: list[str]
    claims: list[str]  # tokens
    length: int | None  # None: no blob row
    deleting_ts: int | None


def blob_refs_txn(txn: Txn, sha256: str) -> BlobRefs:
    """Read-only: what references a blob, for ``gc``'s dry run."""
    txn.execute(f"SELECT path FROM {PATHS} WHERE sha256 = ?", (sha256,))
    paths = [str(r[0]) for r in txn.fetchall()]
    txn.execute(f"SELECT token FROM {CLAIMS} WHERE sha256 = ?", (sha256,))
    claims = [str(r[0]) for r in txn.fetchall()]
    txn.execute(f"SELECT length, deleting_ts FROM {BLOBS} WHERE sha256 = ?", (sha256,))
    row = txn.fetchone()
    if row is None:
        return BlobRefs(paths, claims, None, None)
    return BlobRefs(paths, claims, int(row[0]), None if row[1] is None else int(row[1]))


def path_sha256_txn(txn: Txn, path: str) -> str | None:
    txn.execute(f"SELECT sha256 FROM {PATHS} WHERE path = ?", (path,))
    row = txn.fetchone()
    return None if row is None else str(row[0])


def orphan_paths_txn(txn: Txn, cutoff: int, limit: int = 1000) -> list[str]:
    """The paths of :func:`orphan_path_rows_txn`."""
    return [path for path, _sha256 in orphan_path_rows_txn(txn, cutoff, limit)]


def orphan_path_rows_txn(
    txn: Txn, cutoff: int, limit: int = 1000, after: str = ""
) -> list[tuple[str, str]]:
    """(path, sha256) of paths with no media row that no tombstone explains, old enough
    to be given up, in path order after ``after`` (keyset pagination).

    Tombstones are the exact signal (see :func:`apply_tombstones_txn`, which ``gc``
    runs first). Without them, a path with no media row may be an upload in flight:
    Synapse inserts its media and thumbnail rows only after the providers have
    stored the file. So only paths indexed before the triggers existed are judged by
    ``cutoff`` (the grace) alone; later ones must also be older than
    :data:`UNEXPLAINED_PATH_MIN_AGE_MS`, whatever the grace.
    """
    since = tombstones_since_txn(txn)
    if since is None:
        since = 1 << 62
    unexplained = min(cutoff, now_ms() - UNEXPLAINED_PATH_MIN_AGE_MS)
    txn.execute(
        f"SELECT p.path, p.sha256 FROM {PATHS} p WHERE p.path > ? AND"
        " ((p.created_ts < ? AND p.created_ts < ?) OR p.created_ts < ?)"
        f" AND {_NO_MEDIA_ROW} ORDER BY p.path LIMIT ?",
        (after, since, cutoff, unexplained, limit),
    )
    return [(str(r[0]), str(r[1])) for r in txn.fetchall()]


def delete_path_txn(txn: Txn, path: str, cutoff: int) -> bool:
    txn.execute(f"SELECT sha256 FROM {PATHS} WHERE path = ? AND created_ts < ?", (path, cutoff))
    row = txn.fetchone()
    if row is None:
        return False
    txn.execute(
        f"DELETE FROM {PATHS} WHERE path = ? AND sha256 = ? AND created_ts < ?",
        (path, row[0], cutoff),
    )
    if txn.rowcount != 1:
        return False
    _mark_unreferenced_txn(txn, [str(row[0])], now_ms())
    return True


def due_blobs_txn(txn: Txn, cutoff: int, limit: int = 50) -> list[tuple[str, int, int]]:
    """(sha256, length, gen) of blobs unreferenced since before ``cutoff``, oldest first."""
    txn.execute(
        f"SELECT b.sha256, b.length, b.gen FROM {BLOBS} b WHERE b.unref_ts IS NOT NULL"
        f" AND b.unref_ts <= ? AND b.deleting_ts IS NULL AND {_UNREFERENCED}"
        " ORDER BY b.unref_ts, b.sha256 LIMIT ?",
        (cutoff, limit),
    )
    return [(str(r[0]), int(r[1]), int(r[2])) for r in txn.fetchall()]


def unreferenced_blobs_txn(
    txn: Txn, cutoff: int, limit: int = 1000, after: str = ""
) -> list[tuple[str, int, int]]:
    """(sha256, length, gen) of blobs nothing references, unreferenced before ``cutoff``,
    in hash order after ``after`` (keyset pagination): what ``gc`` deletes.

    No grace is needed for safety: an upload in flight holds a claim row, so its
    blob is never in this list. The cutoff is only the operator's "keep recent
    garbage a while" (``unref_ts``, or ``last_ref_ts`` for blobs from before it).
    """
    txn.execute(
        f"SELECT b.sha256, b.length, b.gen FROM {BLOBS} b WHERE b.sha256 > ?"
        " AND COALESCE(b.unref_ts, b.last_ref_ts) <= ?"
        f" AND (b.deleting_ts IS NULL OR b.deleting_ts < {db_now_sql(txn)} - ?)"
        f" AND {_UNREFERENCED} ORDER BY b.sha256 LIMIT ?",
        (after, cutoff, DELETING_STALE_MS, limit),
    )
    return [(str(r[0]), int(r[1]), int(r[2])) for r in txn.fetchall()]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Mark:
    """A deletion's hold on a blob row: its ``gen`` and ``deleting_ts`` as marking left
    them. Any change of the row (an upload taking a dead mark over, another deletion)
    changes ``gen``, so a deletion acts on the row only while both still match."""

    gen: int
    ts: int


def _mark_of_txn(txn: Txn, sha256: str) -> Mark:
    txn.execute(f"SELECT gen, deleting_ts FROM {BLOBS} WHERE sha256 = ?", (sha256,))
    gen, ts = txn.fetchone()
    return Mark(int(gen), int(ts))


def mark_deleting_txn(txn: Txn, sha256: str, gen: int) -> Mark | None:
    """Start deleting a blob's object; None if anything changed since it was chosen.

    One conditional statement: ``gen`` unchanged (no claim, path or other deletion
    touched the row since the scan, checked again by PostgreSQL on the locked row if a
    claim holds it), and no path or claim references it. The row is updated, not
    deleted, so that an upload of the same content arriving now waits instead of
    trusting an object that is about to vanish. The mark's time is the database's, as
    is the time an upload judges it by (:func:`claim_blob_txn`).
    """
    now = db_now_sql(txn)
    txn.execute(
        f"UPDATE {BLOBS} SET deleting_ts = {now}, gen = gen + 1 WHERE sha256 = ? AND gen = ?"
        f" AND (deleting_ts IS NULL OR deleting_ts < {now} - ?)"
        f" AND NOT EXISTS (SELECT 1 FROM {PATHS} p WHERE p.sha256 = ?)"
        f" AND NOT EXISTS (SELECT 1 FROM {CLAIMS} c WHERE c.sha256 = ?)",
        (sha256, gen, DELETING_STALE_MS, sha256, sha256),
    )
    if txn.rowcount != 1:
        return None
    return _mark_of_txn(txn, sha256)


def mark_orphan_object_deleting_txn(txn: Txn, sha256: str, length: int, now: int) -> Mark | None:
    """Claim an object that has no index row at all, so it can be deleted safely."""
    txn.execute(
        f"INSERT INTO {BLOBS} (sha256, length, stored, corrupt, deleting_ts, created_ts,"
        f" last_ref_ts) VALUES (?, ?, 1, 0, {db_now_sql(txn)}, ?, 0)"
        " ON CONFLICT (sha256) DO NOTHING",
        (sha256, length, now),
    )
    if txn.rowcount != 1:
        return None
    return _mark_of_txn(txn, sha256)


def finish_deleting_txn(txn: Txn, sha256: str, mark: Mark) -> bool:
    """The object is deleted: drop the blob row if the deletion still holds its mark.

    Compare-and-set on the mark: if an upload took it over meanwhile, the row is the
    upload's and is left alone (it may describe an object the upload wrote again after
    the delete). False then: the caller must check the object, which this deletion may
    have removed after the upload rewrote it (see ``lifecycle.check_after_lost_mark``).
    """
    txn.execute(
        f"DELETE FROM {BLOBS} WHERE sha256 = ? AND gen = ? AND deleting_ts = ?",
        (sha256, mark.gen, mark.ts),
    )
    return txn.rowcount == 1


def abort_deleting_txn(txn: Txn, sha256: str, mark: Mark) -> bool:
    """A deletion failed half-way: release the mark, and since the object may or may not
    exist any more, record it as not stored (the next store writes it again). Nothing
    references a marked row, so no path is left pointing at "not stored". False if the
    mark was lost (the caller then checks the object, as after :func:`finish_deleting_txn`)."""
    txn.execute(
        f"UPDATE {BLOBS} SET deleting_ts = NULL, stored = 0, gen = gen + 1"
        " WHERE sha256 = ? AND gen = ? AND deleting_ts = ?",
        (sha256, mark.gen, mark.ts),
    )
    return txn.rowcount == 1


def unmark_deleting_txn(txn: Txn, sha256: str, mark: Mark) -> bool:
    """A deletion gave up before touching the object: release the mark, nothing else
    (the blob stays due; the next pass tries again)."""
    txn.execute(
        f"UPDATE {BLOBS} SET deleting_ts = NULL, gen = gen + 1"
        " WHERE sha256 = ? AND gen = ? AND deleting_ts = ?",
        (sha256, mark.gen, mark.ts),
    )
    return txn.rowcount == 1


def known_blobs_page_txn(txn: Txn, after: str, limit: int) -> list[str]:
    """Hashes with a blob row, in order, after ``after``: a page of the merge in ``gc``."""
    txn.execute(f"SELECT sha256 FROM {BLOBS} WHERE sha256 > ? ORDER BY sha256 LIMIT ?", (after, limit))
    return [str(r[0]) for r in txn.fetchall()]


def path_indexed_txn(txn: Txn, path: str) -> bool:
    txn.execute(f"SELECT 1 FROM {PATHS} WHERE path = ?", (path,))
    return txn.fetchone() is not None


# --- stats ---------------------------------------------------------------------


# ``stats`` lists the largest duplicates by default only up to this many paths: the
# list needs a scan of the whole paths table (1.6-3.3 s at 10^6 paths on PostgreSQL, 30 s
# at 10^7, B7), which the running totals do not. Above it, ``--top N`` asks for it.
DUPLICATES_SCAN_MAX_PATHS = 100_000


def stats_txn(txn: Txn, top: int | None = None) -> dict[str, Any]:
    """What ``synapse-msc3916 stats`` prints; the counts come from the running totals
    (folded first, so that a server whose deletion job never runs keeps one row).

    ``top``: how many largest duplicates to list; ``None``: 10, or none when the index
    holds more than :data:`DUPLICATES_SCAN_MAX_PATHS` paths (``duplicates_skipped``).
    """
    compact_totals_txn(txn)
    paths, logical, objects, stored, corrupt = totals_txn(txn)
    skipped = top is None and paths > DUPLICATES_SCAN_MAX_PATHS
    if top is None:
        top = 0 if skipped else 10
    rows: list[Any] = []
    if top > 0:
        txn.execute(
            f"SELECT sha256, COUNT(*), MAX(length) FROM {PATHS} GROUP BY sha256"
            " HAVING COUNT(*) > 1 ORDER BY (COUNT(*) - 1) * MAX(length) DESC, sha256 LIMIT ?",
            (top,),
        )
        rows = txn.fetchall()
    dups = [
        {
            "sha256": str(sha),
            "paths": int(n),
            "length": int(size),
            "saved": (int(n) - 1) * int(size),
        }
        for sha, n, size in rows
    ]
    logical, stored = int(logical), int(stored)
    return {
        "paths": int(paths),
        "objects": int(objects),
        "corrupt_objects": int(corrupt),
        "logical_bytes": logical,
        "stored_bytes": stored,
        "saved_bytes": max(logical - stored, 0),
        "dedup_ratio": round(logical / stored, 3) if stored else 1.0,
        "largest_duplicates": dups,
        "duplicates_skipped": skipped,
    }


class ToolTxn:
    """A cursor over :class:`~synapse_msc3916.homeserver_config.Database` with the
    transaction interface above, for the command-line tools."""

    def __init__(self, db: Any):
        self._db = db
        self.engine = db.engine
        self._cur: Any = None
        self.rowcount = -1

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        self._cur = self._db.execute(sql, args)
        self.rowcount = self._cur.rowcount
        return self._cur

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())

    def fetchone(self) -> Any:
        return self._cur.fetchone()


def run_tool_txn(db: Any, func: Any, *args: Any) -> Any:
    """Run ``func(txn, *args)`` in one committed transaction of a tool's connection."""
    txn = ToolTxn(db)
    try:
        result = func(txn, *args)
    except BaseException:
        db.conn.rollback()
        raise
    db.commit()
    return result
