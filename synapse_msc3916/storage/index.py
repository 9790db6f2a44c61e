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
TOOL_RUNS = "msc3916_storage_tool_runs"

# Paths with no media row that no tombstone explains (an upload whose media row Synapse
# then failed to insert) are forgotten by ``gc`` only once they are this old: far longer
# than the moment between a provider returning and Synapse inserting its row.
UNEXPLAINED_PATH_MIN_AGE_MS = 60 * 60 * 1000
# Claims left by a process that died mid-upload are released when that process starts
# again; ``gc`` releases any claim older than this (a CLI crash, a retired worker).
CLAIM_STALE_MS = 24 * 60 * 60 * 1000

# How long a garbage collection may hold a blob in the "deleting" state before an
# upload of the same content takes the blob over. It bounds how long an upload can wait;
# a GC deletes one object between marking and unmarking, which takes far less.
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


def _step_tool_runs(txn: Txn) -> None:
    """Version 4: one row per offline tool (``migrate``, ``scrub``, ``gc``): who runs it
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
    (4, [_step_tool_runs]),
]
SCHEMA_VERSION = _STEPS[-1][0]


def now_ms() -> int:
    return int(time.time() * 1000)


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
    ``instance`` lets a restarted process release the claims its previous life left.
    """

    token: str
    path: str
    instance: str


class LostClaim(RuntimeError):
    """The blob row an upload claimed is gone: its claim was released behind its back
    (a stale-claim cleanup), so the object may have been deleted."""


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
            f"SELECT stored, corrupt, deleting_ts, gen FROM {BLOBS} WHERE sha256 = ?{_lock(txn)}",
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
        stored, corrupt, deleting_ts, gen = row
        if deleting_ts is not None and now - int(deleting_ts) < DELETING_STALE_MS:
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
        f"INSERT INTO {CLAIMS} (token, sha256, path, instance, created_ts) VALUES (?, ?, ?, ?, ?)",
        (claim.token, sha256, claim.path, claim.instance, now),
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


def release_claim_txn(txn: Txn, token: str, now: int) -> None:
    """An upload failed after claiming: drop its reference (the blob may now be garbage)."""
    txn.execute(f"SELECT sha256 FROM {CLAIMS} WHERE token = ?", (token,))
    row = txn.fetchone()
    if row is None:
        return
    txn.execute(f"DELETE FROM {CLAIMS} WHERE token = ?", (token,))
    _mark_unreferenced_txn(txn, [str(row[0])], now)


def release_stale_claims_txn(
    txn: Txn, now: int, instance: str | None = None, before: int | None = None
) -> int:
    """Release claims no upload holds any more.

    With ``instance``: the claims that process made before ``before`` (its start
    time), i.e. in a previous life, since a process that starts has no upload in
    flight. Without: claims older than :data:`CLAIM_STALE_MS` (what ``gc`` does).
    """
    if instance is not None:
        assert before is not None
        txn.execute(
            f"SELECT token, sha256 FROM {CLAIMS} WHERE instance = ? AND created_ts < ?",
            (instance, before),
        )
    else:
        txn.execute(
            f"SELECT token, sha256 FROM {CLAIMS} WHERE created_ts < ?", (now - CLAIM_STALE_MS,)
        )
    rows = txn.fetchall()
    for token, _sha in rows:
        txn.execute(f"DELETE FROM {CLAIMS} WHERE token = ?", (token,))
    _mark_unreferenced_txn(txn, [str(r[1]) for r in rows], now)
    return len(rows)


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
    blob is referenced without a gap. Raises :class:`LostClaim` if the blob row is gone
    (the upload must then fail rather than acknowledge bytes that may be deleted).
    """
    txn.execute(
        f"UPDATE {BLOBS} SET "
        + ("stored = 1, corrupt = 0, " if stored else "")
        + "last_ref_ts = ?, unref_ts = NULL, gen = gen + 1 WHERE sha256 = ?",
        (now, sha256),
    )
    if txn.rowcount == 0 and claim is not None:
        raise LostClaim(f"the blob {sha256} was deleted while {path} was being stored")
    txn.execute(f"SELECT sha256 FROM {PATHS} WHERE path = ?", (path,))
    previous = txn.fetchone()
    txn.execute(
        f"INSERT INTO {PATHS} (path, sha256, length, media_origin, file_id,"
        " thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method, created_ts)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (path) DO UPDATE SET sha256 = excluded.sha256,"
        " length = excluded.length, created_ts = excluded.created_ts",
        (
            path,
            sha256,
            length,
            ref.media_origin,
            ref.file_id,
            ref.thumbnail_width,
            ref.thumbnail_height,
            ref.thumbnail_type,
            ref.thumbnail_method,
            now,
        ),
    )
    if claim is not None:
        txn.execute(f"DELETE FROM {CLAIMS} WHERE token = ?", (claim.token,))
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
        f"INSERT INTO {PATHS} (path, sha256, length, media_origin, file_id,"
        " thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method, created_ts)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO NOTHING",
        (
            path,
            sha256,
            length,
            ref.media_origin,
            ref.file_id,
            ref.thumbnail_width,
            ref.thumbnail_height,
            ref.thumbnail_type,
            ref.thumbnail_method,
            now,
        ),
    )
    if txn.rowcount != 1:
        release_claim_txn(txn, claim.token, now)
        return False
    record_path_txn(txn, path, sha256, length, ref, now, True, claim)
    return True


def synapse_length_txn(txn: Txn, ref: MediaRef) -> int | None:
    """The length Synapse recorded for a local media file or thumbnail; None without a
    row. (Remote ones: :func:`remote_rows_txn`, a lookup by ``filesystem_id`` has no
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


def remote_rows_txn(
    txn: Txn, origin: str, thumbnails: bool, with_sha256: bool
) -> dict[Any, tuple[int | None, str | None]]:
    """Synapse's rows of one origin's remote media (or thumbnails), keyed as a path
    names them: ``filesystem_id`` (plus the thumbnail's dimensions, type and method),
    with (length, SHA-256). One range of Synapse's ``(media_origin, media_id)`` index."""
    if thumbnails:
        txn.execute(
            "SELECT filesystem_id, thumbnail_width, thumbnail_height, thumbnail_type,"
            " thumbnail_method, thumbnail_length FROM remote_media_cache_thumbnails"
            " WHERE media_origin = ?",
            (origin,),
        )
        return {
            (str(r[0]), r[1], r[2], r[3], r[4]): (None if r[5] is None else int(r[5]), None)
            for r in txn.fetchall()
        }
    sha = "sha256" if with_sha256 else "NULL"
    txn.execute(
        f"SELECT filesystem_id, media_length, {sha} FROM remote_media_cache"
        " WHERE media_origin = ?",
        (origin,),
    )
    return {
        str(r[0]): (None if r[1] is None else int(r[1]), None if r[2] is None else str(r[2]))
        for r in txn.fetchall()
    }


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
    """Read-only: (token, sha256) of the claims ``gc`` releases (older than
    :data:`CLAIM_STALE_MS`)."""
    txn.execute(
        f"SELECT token, sha256 FROM {CLAIMS} WHERE created_ts < ?", (now - CLAIM_STALE_MS,)
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
    """Paths with no media row that no tombstone explains, old enough to be given up.

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
        f"SELECT p.path FROM {PATHS} p WHERE"
        " ((p.created_ts < ? AND p.created_ts < ?) OR p.created_ts < ?)"
        f" AND {_NO_MEDIA_ROW} ORDER BY p.path LIMIT ?",
        (since, cutoff, unexplained, limit),
    )
    return [str(r[0]) for r in txn.fetchall()]


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
        " AND (b.deleting_ts IS NULL OR b.deleting_ts < ?)"
        f" AND {_UNREFERENCED} ORDER BY b.sha256 LIMIT ?",
        (after, cutoff, now_ms() - DELETING_STALE_MS, limit),
    )
    return [(str(r[0]), int(r[1]), int(r[2])) for r in txn.fetchall()]


def mark_deleting_txn(txn: Txn, sha256: str, gen: int, now: int) -> bool:
    """Start deleting a blob's object; False if anything changed since it was chosen.

    One conditional statement: ``gen`` unchanged (no claim, path or other deletion
    touched the row since the scan, checked again by PostgreSQL on the locked row if a
    claim holds it), and no path or claim references it. The row is updated, not
    deleted, so that an upload of the same content arriving now waits instead of
    trusting an object that is about to vanish.
    """
    txn.execute(
        f"UPDATE {BLOBS} SET deleting_ts = ?, gen = gen + 1 WHERE sha256 = ? AND gen = ?"
        " AND (deleting_ts IS NULL OR deleting_ts < ?)"
        f" AND NOT EXISTS (SELECT 1 FROM {PATHS} p WHERE p.sha256 = ?)"
        f" AND NOT EXISTS (SELECT 1 FROM {CLAIMS} c WHERE c.sha256 = ?)",
        (now, sha256, gen, now - DELETING_STALE_MS, sha256, sha256),
    )
    return txn.rowcount == 1


def mark_orphan_object_deleting_txn(txn: Txn, sha256: str, length: int, now: int) -> bool:
    """Claim an object that has no index row at all, so it can be deleted safely."""
    txn.execute(
        f"INSERT INTO {BLOBS} (sha256, length, stored, corrupt, deleting_ts, created_ts,"
        " last_ref_ts) VALUES (?, ?, 1, 0, ?, ?, 0) ON CONFLICT (sha256) DO NOTHING",
        (sha256, length, now, now),
    )
    return txn.rowcount == 1


def finish_deleting_txn(txn: Txn, sha256: str, deleting_ts: int) -> bool:
    """The object is deleted: drop the blob row if the deletion still holds its mark.

    If an upload took the mark over meanwhile (a mark older than
    ``DELETING_STALE_MS``), the row must not go on claiming an object this deletion
    may just have removed: it is set back to "not stored", so the next store of the
    content writes it again. Returns whether the mark was still held.
    """
    txn.execute(f"DELETE FROM {BLOBS} WHERE sha256 = ? AND deleting_ts = ?", (sha256, deleting_ts))
    if txn.rowcount == 1:
        return True
    txn.execute(f"UPDATE {BLOBS} SET stored = 0, gen = gen + 1 WHERE sha256 = ?", (sha256,))
    return False


def abort_deleting_txn(txn: Txn, sha256: str, deleting_ts: int) -> None:
    """A deletion failed half-way: release the mark, and since the object may or may not
    exist any more, record it as not stored (the next store writes it again)."""
    txn.execute(
        f"UPDATE {BLOBS} SET deleting_ts = NULL, stored = 0, gen = gen + 1"
        " WHERE sha256 = ? AND deleting_ts = ?",
        (sha256, deleting_ts),
    )


def known_blobs_page_txn(txn: Txn, after: str, limit: int) -> list[str]:
    """Hashes with a blob row, in order, after ``after``: a page of the merge in ``gc``."""
    txn.execute(f"SELECT sha256 FROM {BLOBS} WHERE sha256 > ? ORDER BY sha256 LIMIT ?", (after, limit))
    return [str(r[0]) for r in txn.fetchall()]


def path_indexed_txn(txn: Txn, path: str) -> bool:
    txn.execute(f"SELECT 1 FROM {PATHS} WHERE path = ?", (path,))
    return txn.fetchone() is not None


# --- stats ---------------------------------------------------------------------


def stats_txn(txn: Txn, top: int = 10) -> dict[str, Any]:
    txn.execute(f"SELECT COUNT(*), COALESCE(SUM(length), 0) FROM {PATHS}", ())
    paths, logical = txn.fetchone()
    txn.execute(f"SELECT COUNT(*), COALESCE(SUM(length), 0) FROM {BLOBS} WHERE stored = 1", ())
    objects, stored = txn.fetchone()
    txn.execute(f"SELECT COUNT(*) FROM {BLOBS} WHERE corrupt = 1", ())
    corrupt = txn.fetchone()[0]
    txn.execute(
        f"SELECT sha256, COUNT(*), MAX(length) FROM {PATHS} GROUP BY sha256"
        " HAVING COUNT(*) > 1 ORDER BY (COUNT(*) - 1) * MAX(length) DESC, sha256 LIMIT ?",
        (top,),
    )
    dups = [
        {
            "sha256": str(sha),
            "paths": int(n),
            "length": int(size),
            "saved": (int(n) - 1) * int(size),
        }
        for sha, n, size in txn.fetchall()
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
