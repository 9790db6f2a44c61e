"""The claim protocol on PostgreSQL at READ COMMITTED, interleavings forced by hand.

Two psycopg2 connections stand for an upload (``claim_blob_txn``) and a deletion
(``mark_deleting_txn``, by ``gc`` or the deletion job), each holding its transaction
open while the other runs, committing in the orders that used to lose data. Each test
checks that the second statement really waited on the first (``pg_stat_activity``
says it is waiting on a lock): an interleaving that did not happen proves nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from synapse_msc3916.homeserver_config import Database
from synapse_msc3916.storage import index
from synapse_msc3916.synapse_adapter import media_deletions
from tests.harness import TOPOLOGY
from tests.harness_workers import PostgreSQL, shared_postgres

SHA = "cd" * 32
_databases = iter(range(1000))


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgreSQL]:
    """The workers topology's server when there is one, else one of this module's own."""
    if TOPOLOGY == "workers":
        yield shared_postgres()
        return
    server = PostgreSQL()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def dbname(postgres: PostgreSQL) -> str:
    name = f"claims_{next(_databases)}_{int(time.time())}"
    postgres.create_database(name)
    db = Database(postgres.connect(name), "postgres")
    try:
        for sql in (
            "CREATE TABLE local_media_repository (media_id TEXT PRIMARY KEY, media_length BIGINT,"
            " sha256 TEXT)",
            "CREATE TABLE remote_media_cache (media_origin TEXT, media_id TEXT, filesystem_id TEXT,"
            " media_length BIGINT, sha256 TEXT)",
            "CREATE TABLE local_media_repository_thumbnails (media_id TEXT, thumbnail_width INTEGER,"
            " thumbnail_height INTEGER, thumbnail_type TEXT, thumbnail_method TEXT)",
            "CREATE TABLE remote_media_cache_thumbnails (media_origin TEXT, media_id TEXT,"
            " filesystem_id TEXT, thumbnail_width INTEGER, thumbnail_height INTEGER,"
            " thumbnail_type TEXT, thumbnail_method TEXT)",
        ):
            db.execute(sql)
        index.run_tool_txn(db, index.ensure_schema_txn)
    finally:
        db.close()
    return name


@pytest.fixture
def conns(postgres: PostgreSQL, dbname: str) -> Iterator[tuple[Database, Database, Database]]:
    """upload, deletion, observer: three sessions at READ COMMITTED (psycopg2's default)."""
    dbs = tuple(Database(postgres.connect(dbname), "postgres") for _ in range(3))
    yield dbs  # type: ignore[misc]
    for db in dbs:
        db.conn.rollback()
        db.close()


def _waiting_on_lock(observer: Database, session: Database) -> bool:
    rows = observer.query(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = ?", (session.conn.get_backend_pid(),)
    )
    observer.commit()
    return bool(rows) and rows[0][0] == "Lock"


class _Background:
    """Run one transaction function on a session in a thread; keep its result."""

    def __init__(self, func: Any):
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(func,))
        self.thread.start()

    def _run(self, func: Any) -> None:
        try:
            self.result = func()
        except BaseException as e:  # surfaced by join()
            self.error = e

    def join(self) -> Any:
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


def _wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _garbage_blob(db: Database) -> int:
    """A stored blob nothing references (its media was deleted): a deletion candidate."""
    now = index.now_ms()
    index.run_tool_txn(db, index.claim_blob_txn, SHA, 10, now)
    index.run_tool_txn(
        db, index.record_path_txn, "local_content/ol/d/x", SHA, 10, index.MediaRef(None, "oldx"),
        now, True,
    )
    db.execute(f"DELETE FROM {index.PATHS}")
    db.execute(f"UPDATE {index.BLOBS} SET unref_ts = ?", (now - 1000,))
    db.commit()
    [(sha, _length, gen)] = index.run_tool_txn(db, index.due_blobs_txn, now, 10)
    assert sha == SHA
    return int(gen)


def _blob(db: Database) -> tuple[Any, ...] | None:
    rows = db.query(f"SELECT stored, deleting_ts FROM {index.BLOBS} WHERE sha256 = ?", (SHA,))
    db.commit()
    return rows[0] if rows else None


def test_a_deletion_marking_during_a_claim_waits_and_then_gives_up(
    conns: tuple[Database, Database, Database],
) -> None:
    """The old bug: the upload read the row, a deletion marked it and committed, the
    upload then cleared the mark unconditionally and took a dedup hit on an object the
    deletion went on to delete. Now the claim holds the row from its read on."""
    upload, deletion, observer = conns
    gen = _garbage_blob(deletion)  # the deletion's scan chose this blob at this gen
    claim = index.Claim("tok-1", "local_content/ne/w/y", "media1")
    # The upload's claim: read (under the row lock) and update, not committed yet.
    decision = index.claim_blob_txn(index.ToolTxn(upload), SHA, 10, index.now_ms(), claim)
    assert decision == (index.HIT, False)
    # The deletion marks now, in the middle of the claim's transaction ...
    marking = _Background(
        lambda: index.mark_deleting_txn(index.ToolTxn(deletion), SHA, gen, index.now_ms())
    )
    _wait_until(lambda: _waiting_on_lock(observer, deletion), "the mark waits on the claim's lock")
    # ... and the claim commits while the mark waits.
    upload.commit()
    assert marking.join() is False  # the row changed under it: nothing marked
    deletion.commit()
    assert _blob(observer) == (1, None)
    # The upload records its path; the blob is referenced, not a candidate any more.
    index.run_tool_txn(
        upload, index.record_path_txn, claim.path, SHA, 10, index.MediaRef(None, "newy"),
        index.now_ms(), True, claim,
    )
    assert index.run_tool_txn(observer, index.due_blobs_txn, index.now_ms() + 10**9, 10) == []
    assert index.run_tool_txn(
        observer, index.unreferenced_blobs_txn, index.now_ms() + 10**9
    ) == []


class _PausingTxn(index.ToolTxn):
    """Stops right after the claim has read the blob row, until told to go on."""

    def __init__(self, db: Database):
        super().__init__(db)
        self.paused = threading.Event()
        self.resume = threading.Event()

    def execute(self, sql: str, args: Any = ()) -> Any:
        cur = super().execute(sql, args)
        if sql.startswith("SELECT stored, corrupt, deleting_ts, gen") and not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(30)
        return cur


def test_a_deletion_cannot_commit_between_the_claims_read_and_its_update(
    conns: tuple[Database, Database, Database],
) -> None:
    """Exactly the reported interleaving: the claim has read the row (clean, stored)
    and not yet updated it when a deletion tries to mark it and commit."""
    upload, deletion, observer = conns
    gen = _garbage_blob(deletion)
    txn = _PausingTxn(upload)
    claim = index.Claim("tok-5", "local_content/mi/d/r", "media1")
    claiming = _Background(lambda: index.claim_blob_txn(txn, SHA, 10, index.now_ms(), claim))
    assert txn.paused.wait(10)
    marking = _Background(
        lambda: index.mark_deleting_txn(index.ToolTxn(deletion), SHA, gen, index.now_ms())
    )
    # The read holds the row: the mark cannot slip in between read and update.
    _wait_until(lambda: _waiting_on_lock(observer, deletion), "the mark waits on the claim's read")
    txn.resume.set()
    assert claiming.join() == (index.HIT, False)
    upload.commit()
    assert marking.join() is False
    deletion.commit()
    assert _blob(observer) == (1, None)


def test_a_claim_during_a_deletion_waits_then_writes_the_object_again(
    conns: tuple[Database, Database, Database],
) -> None:
    """The other order: the deletion marked first and deletes the object; an upload of
    the same content must neither trust the object nor lose the mark's outcome."""
    upload, deletion, observer = conns
    gen = _garbage_blob(deletion)
    mark = index.now_ms()
    assert index.mark_deleting_txn(index.ToolTxn(deletion), SHA, gen, mark)  # not committed
    claim = index.Claim("tok-2", "local_content/ne/w/z", "media2")
    claiming = _Background(
        lambda: index.claim_blob_txn(index.ToolTxn(upload), SHA, 10, index.now_ms(), claim)
    )
    _wait_until(lambda: _waiting_on_lock(observer, upload), "the claim waits on the mark's lock")
    deletion.commit()
    assert claiming.join() == (index.WAIT, False)  # sees the committed mark: waits
    upload.commit()
    # The deletion deletes the object and finishes; the upload's next try writes it.
    assert index.run_tool_txn(deletion, index.finish_deleting_txn, SHA, mark) is True
    assert _blob(observer) is None
    assert index.run_tool_txn(upload, index.claim_blob_txn, SHA, 10, index.now_ms(), claim) == (
        index.WRITE,
        False,
    )
    index.run_tool_txn(
        upload, index.record_path_txn, claim.path, SHA, 10, index.MediaRef(None, "newz"),
        index.now_ms(), True, claim,
    )
    assert _blob(observer) == (1, None)


def test_a_finish_that_lost_its_mark_never_leaves_a_stored_row(
    conns: tuple[Database, Database, Database],
) -> None:
    """A deletion that stalled past the takeover time, then deleted the object anyway:
    the row must not go on saying the object is stored."""
    upload, deletion, observer = conns
    gen = _garbage_blob(deletion)
    stale = index.now_ms() - index.DELETING_STALE_MS - 1
    assert index.run_tool_txn(deletion, index.mark_deleting_txn, SHA, gen, stale)
    claim = index.Claim("tok-3", "local_content/ta/ke/n", "media1")
    # An upload takes the dead mark over and rewrites the object ...
    assert index.run_tool_txn(upload, index.claim_blob_txn, SHA, 10, index.now_ms(), claim) == (
        index.WRITE,
        True,
    )
    index.run_tool_txn(
        upload, index.record_path_txn, claim.path, SHA, 10, index.MediaRef(None, "taken"),
        index.now_ms(), True, claim,
    )
    # ... then the stalled deletion wakes up, deletes the object, and finishes.
    assert index.run_tool_txn(deletion, index.finish_deleting_txn, SHA, stale) is False
    assert _blob(observer) == (0, None)  # the next store of the content writes it again
    assert index.run_tool_txn(
        upload, index.claim_blob_txn, SHA, 10, index.now_ms(), index.Claim("t4", "p", "m")
    ) == (index.WRITE, False)


def test_triggers_tombstone_deletes_in_the_deleting_transaction(
    conns: tuple[Database, Database, Database],
) -> None:
    synapse, _, observer = conns
    assert sorted(index.run_tool_txn(synapse, media_deletions.ensure_deletion_triggers_txn)) == sorted(
        media_deletions.trigger_name(t) for t, *_ in media_deletions.MEDIA_TABLES
    )
    assert index.run_tool_txn(synapse, media_deletions.ensure_deletion_triggers_txn) == []
    synapse.execute("INSERT INTO local_media_repository VALUES ('m1', 1, NULL)")
    synapse.execute(
        "INSERT INTO remote_media_cache_thumbnails VALUES ('hs', 'r1', 'f1', 32, 32, 'image/png', 'crop')"
    )
    synapse.commit()
    synapse.execute("DELETE FROM local_media_repository")
    synapse.execute("DELETE FROM remote_media_cache_thumbnails")
    # Not committed: nobody else sees a tombstone yet (same transaction as the delete).
    assert observer.query(f"SELECT COUNT(*) FROM {index.TOMBSTONES}") == [(0,)]
    observer.commit()
    synapse.commit()
    rows = observer.query(
        f"SELECT media_origin, file_id, thumbnail_width, thumbnail_height, thumbnail_type,"
        f" thumbnail_method FROM {index.TOMBSTONES} ORDER BY id"
    )
    assert rows == [(None, "m1", None, None, None, None), ("hs", "f1", 32, 32, "image/png", "crop")]
