"""The claim protocol on PostgreSQL at READ COMMITTED, interleavings forced by hand.

Two psycopg2 connections stand for an upload (``claim_blob_txn``) and a deletion
(``mark_deleting_txn``, by ``gc`` or the deletion job), each holding its transaction
open while the other runs, committing in the orders that used to lose data. Each test
checks that the second statement really waited on the first (``pg_stat_activity``
says it is waiting on a lock): an interleaving that did not happen proves nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import attr
import pytest

from synapse_msc3916.homeserver_config import Database
from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import FileBlobStore
from synapse_msc3916.storage.lifecycle import DeletionJob
from synapse_msc3916.synapse_adapter import media_deletions
from tests.harness_workers import PostgreSQL, postgres_for_module

SHA = "cd" * 32
_databases = iter(range(1000))


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgreSQL]:
    """The workers topology's server when there is one, else one of this module's own."""
    with postgres_for_module() as server:
        yield server


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
        lambda: index.mark_deleting_txn(index.ToolTxn(deletion), SHA, gen)
    )
    _wait_until(lambda: _waiting_on_lock(observer, deletion), "the mark waits on the claim's lock")
    # ... and the claim commits while the mark waits.
    upload.commit()
    assert marking.join() is None  # the row changed under it: nothing marked
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
        lambda: index.mark_deleting_txn(index.ToolTxn(deletion), SHA, gen)
    )
    # The read holds the row: the mark cannot slip in between read and update.
    _wait_until(lambda: _waiting_on_lock(observer, deletion), "the mark waits on the claim's read")
    txn.resume.set()
    assert claiming.join() == (index.HIT, False)
    upload.commit()
    assert marking.join() is None
    deletion.commit()
    assert _blob(observer) == (1, None)


def test_a_claim_during_a_deletion_waits_then_writes_the_object_again(
    conns: tuple[Database, Database, Database],
) -> None:
    """The other order: the deletion marked first and deletes the object; an upload of
    the same content must neither trust the object nor lose the mark's outcome."""
    upload, deletion, observer = conns
    gen = _garbage_blob(deletion)
    mark = index.mark_deleting_txn(index.ToolTxn(deletion), SHA, gen)  # not committed
    assert mark is not None
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


def test_a_finish_that_lost_its_mark_leaves_the_uploads_row_alone(
    conns: tuple[Database, Database, Database],
) -> None:
    """A deletion that stalled past the takeover time, then finished: the row is the
    upload's now. Before issue 18 it was set to ``stored = 0`` blindly, leaving the
    upload's path unreadable although its object had been written again."""
    upload, deletion, observer = conns
    gen = _garbage_blob(deletion)
    mark = index.run_tool_txn(deletion, index.mark_deleting_txn, SHA, gen)
    assert mark is not None
    # The mark grows old (by the database's clock, which judges it).
    deletion.execute(
        f"UPDATE {index.BLOBS} SET deleting_ts = deleting_ts - ?", (index.DELETING_STALE_MS + 1,)
    )
    deletion.commit()
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
    # ... then the stalled deletion finishes: it lost its mark and touches nothing.
    stale = attr.evolve(mark, ts=mark.ts - index.DELETING_STALE_MS - 1)
    assert index.run_tool_txn(deletion, index.finish_deleting_txn, SHA, stale) is False
    assert index.run_tool_txn(deletion, index.finish_deleting_txn, SHA, mark) is False
    assert index.run_tool_txn(deletion, index.abort_deleting_txn, SHA, stale) is False
    assert _blob(observer) == (1, None)
    assert index.run_tool_txn(
        upload, index.claim_blob_txn, SHA, 10, index.now_ms(), index.Claim("t4", "p", "m")
    ) == (index.HIT, False)


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


# --- a deletion whose mark is taken over (issue 18, item 6) ----------------------------

CONTENT = b"acknowledged upload bytes"
CSHA = hashlib.sha256(CONTENT).hexdigest()
UPLOAD_PATH = "local_content/ac/kn/owledged"


class _Clock:
    """The deletion job's monotonic clock, moved by hand along with the database's."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _stored_garbage(db: Database, store: FileBlobStore, tmp_path: Any) -> str:
    """CONTENT stored (object written), then its media deleted: due for deletion now."""
    source = tmp_path / "upload"
    source.write_bytes(CONTENT)
    assert store.put_file(CSHA, str(source), len(CONTENT))
    now = index.now_ms()
    index.run_tool_txn(db, index.claim_blob_txn, CSHA, len(CONTENT), now)
    index.run_tool_txn(
        db, index.record_path_txn, "local_content/ol/d/y", CSHA, len(CONTENT),
        index.MediaRef(None, "oldy"), now, True,
    )
    db.execute(f"DELETE FROM {index.PATHS}")
    db.execute(f"UPDATE {index.BLOBS} SET unref_ts = ?", (now - 10**7,))
    db.commit()
    return str(source)


def _row(db: Database) -> tuple[Any, ...] | None:
    rows = db.query(
        f"SELECT stored, corrupt, deleting_ts FROM {index.BLOBS} WHERE sha256 = ?", (CSHA,)
    )
    db.commit()
    return rows[0] if rows else None


def _claim_and_write(
    db: Database, store: FileBlobStore, source: str, token: str
) -> tuple[index.Claim, str, bool]:
    """The first half of an upload of CONTENT, as the provider's store_file does it."""
    claim = index.Claim(token, UPLOAD_PATH, "media2")
    decision, overwrite = index.run_tool_txn(
        db, index.claim_blob_txn, CSHA, len(CONTENT), int(time.time() * 1000), claim
    )
    if decision == index.WRITE:
        store.put_file(CSHA, source, len(CONTENT), overwrite)
    return claim, decision, overwrite


def _record_upload(db: Database, claim: index.Claim) -> None:
    """The second half: the path is recorded, and the upload acknowledged."""
    index.run_tool_txn(
        db, index.record_path_txn, UPLOAD_PATH, CSHA, len(CONTENT),
        index.MediaRef(None, "acknowledged"), int(time.time() * 1000), True, claim,
    )


def _upload(db: Database, store: FileBlobStore, source: str, token: str) -> tuple[str, bool]:
    """A whole upload of CONTENT (unless told to wait); its claim's answer."""
    claim, decision, overwrite = _claim_and_write(db, store, source, token)
    if decision != index.WAIT:
        _record_upload(db, claim)
    return decision, overwrite


@pytest.mark.parametrize("stall", ["queue", "finish", "landing", "landing_unrecorded", "skew"])
def test_a_stalled_deletion_never_loses_an_upload_that_took_its_mark_over(
    conns: tuple[Database, Database, Database],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    stall: str,
) -> None:
    """The deletion job marks a garbage content, then stalls; an upload of the same
    content arrives meanwhile, and is acknowledged. Where the job stalls:

    * ``queue``: between its mark and its S3 delete (the delete waited in a busy
      pool's queue longer than a mark is honoured). Before the fix the upload took the
      mark over and rewrote the object, the stale delete then removed it and
      ``finish_deleting`` set ``stored = 0``: the acknowledged upload was lost.
    * ``finish``: between the delete and ``finish_deleting`` (the settling
      transaction of the batch); the upload rewrote the
      deleted object. Before the fix the row was set to ``stored = 0`` although the
      object is there: the upload's path unreadable.
    * ``landing``: the delete lands after the upload rewrote the object (it was in
      flight when the mark was taken over). The object is gone; the fix must say so
      (marked missing, so the next store rewrites it) instead of ``stored = 0`` in
      silence.
    * ``landing_unrecorded``: the same, but the upload has written the object and not
      yet recorded its path when the deletion finds the object gone: it must fail
      rather than be acknowledged (and clear the "missing" mark). Before the fix it was
      acknowledged (``DID NOT RAISE``) with its object gone and the row ``stored = 0``.
    * ``skew``: no stall at all, the job's clock is 60 s behind the upload's. Before
      the fix the mark (taken with the job's clock) looked dead to the upload at once.
    """
    upload, deletion, observer = conns
    store = FileBlobStore(str(tmp_path / "objects"))
    source = _stored_garbage(deletion, store, tmp_path)
    clock = _Clock()
    seen: dict[str, Any] = {"deletes": 0}

    def age_the_mark() -> None:
        # DELETING_STALE_MS pass for the job's clock and for the database's.
        clock.now += index.DELETING_STALE_MS / 1000 + 1
        observer.execute(
            f"UPDATE {index.BLOBS} SET deleting_ts = deleting_ts - ? WHERE sha256 = ?",
            (index.DELETING_STALE_MS + 1000, CSHA),
        )
        observer.commit()

    def upload_arrives() -> None:
        assert seen.get("upload") is None
        assert _row(observer)[2] is not None  # the job's mark is there
        seen["upload"] = _upload(upload, store, source, "tok-up")

    class StallingStore:
        def delete(self, sha256: str) -> None:
            if stall == "landing":
                age_the_mark()
                upload_arrives()
                assert seen["upload"] == (index.WRITE, True)  # the race: mark taken over
            elif stall == "landing_unrecorded":
                age_the_mark()
                seen["unrecorded"] = _claim_and_write(upload, store, source, "tok-up")
                assert seen["unrecorded"][1:] == (index.WRITE, True)  # the mark taken over
                seen["upload"] = "written, not recorded"
            store.delete(sha256)
            seen["deletes"] += 1

        def delete_many(self, sha256s: list[str]) -> dict[str, str]:
            for sha256 in sha256s:
                self.delete(sha256)
            return {}

        def stat(self, sha256: str) -> int | None:
            return store.stat(sha256)

    async def db(desc: str, func: Any, *args: Any) -> Any:
        if desc == "settle_deleting" and stall == "finish":
            assert seen["deletes"] == 1 and store.stat(CSHA) is None
            age_the_mark()
            upload_arrives()
            assert seen["upload"] == (index.WRITE, True)
        return index.run_tool_txn(deletion, func, *args)

    async def in_thread(f: Any, *args: Any) -> Any:
        if stall == "queue" and seen["deletes"] == 0 and "upload" not in seen:
            age_the_mark()
            upload_arrives()
            assert seen["upload"] == (index.WRITE, True)  # the race: mark taken over
        elif stall == "skew" and "upload" not in seen:
            upload_arrives()
        return f(*args)

    if stall == "skew":
        real_now = index.now_ms
        monkeypatch.setattr(index, "now_ms", lambda: real_now() - 60_000)
    job = DeletionJob(db, in_thread, StallingStore(), 0, clock=clock)
    _run(job.run_once())
    monkeypatch.undo()

    assert "upload" in seen  # the upload really arrived while the deletion was under way
    if stall == "skew":
        # The mark holds: the upload waited for the delete, then wrote the object again.
        assert seen["upload"] == (index.WAIT, False)
        assert seen["deletes"] == 1
        assert _upload(upload, store, source, "tok-up2") == (index.WRITE, False)
    if stall == "landing_unrecorded":
        assert seen["deletes"] == 1 and store.stat(CSHA) is None
        with pytest.raises(index.LostClaim):  # the upload fails: nothing acknowledged
            _record_upload(upload, seen["unrecorded"][0])
        assert index.run_tool_txn(observer, index.locate_txn, UPLOAD_PATH) is None
        # The next upload of the content writes the object again.
        assert _upload(upload, store, source, "tok-up4") == (index.WRITE, True)
    located = index.run_tool_txn(observer, index.locate_txn, UPLOAD_PATH)
    assert located is not None and located.sha256 == CSHA
    if stall == "landing":
        # The object is gone (the delete landed after the rewrite): the row says so,
        # and the next store of the content rewrites it.
        assert seen["deletes"] == 1 and store.stat(CSHA) is None
        assert _row(observer) == (1, 1, None)
        assert not located.servable
        assert _upload(upload, store, source, "tok-up3") == (index.WRITE, True)
        located = index.run_tool_txn(observer, index.locate_txn, UPLOAD_PATH)
    # The acknowledged upload is readable and its row consistent.
    assert _row(observer) == (1, 0, None)
    assert located is not None and located.servable
    reader = store.open(CSHA)
    assert reader is not None and reader.read(100) == CONTENT
    reader.close()
    if stall == "queue":
        assert seen["deletes"] == 0  # the stale delete was not sent at all


# --- claims of two processes with one instance name (issue 18, item 7) -----------------


def _start_process(db: Database, instance: str) -> str:
    """What a provider does as it starts, on session ``db``; its claims' identity."""
    boot = uuid.uuid4().hex
    index.run_tool_txn(db, index.boot_heartbeat_txn, boot, instance)
    return boot


def _claim(db: Database, boot: str, token: str) -> index.Claim:
    claim = index.Claim(token, f"local_content/{token}", "media1", boot)
    assert index.run_tool_txn(db, index.claim_blob_txn, SHA, 10, index.now_ms(), claim)[0] in (
        index.WRITE,
        index.HIT,
    )
    return claim


def _record(db: Database, claim: index.Claim) -> None:
    index.run_tool_txn(
        db, index.record_path_txn, claim.path, SHA, 10, index.MediaRef(None, claim.token),
        index.now_ms(), True, claim,
    )


def _claims(db: Database) -> list[str]:
    rows = db.query(f"SELECT token FROM {index.CLAIMS} ORDER BY token")
    db.commit()
    return [str(r[0]) for r in rows]


def test_a_surge_process_with_the_same_name_keeps_the_running_ones_claims(
    conns: tuple[Database, Database, Database],
) -> None:
    """A rolling update with surge: the new process (same instance name) starts while
    the old one is storing an upload. Before the fix its start-up released the old
    process's claim (``assert [] == ['tok-old']``), so a gc could delete the content
    the old process then acknowledged."""
    old, new, observer = conns
    running = _start_process(old, "media1")
    claim = _claim(old, running, "tok-old")
    _start_process(new, "media1")
    assert _claims(observer) == ["tok-old"]
    # gc's own release leaves a fresh claim alone too.
    index.run_tool_txn(observer, index.release_stale_claims_txn, index.now_ms())
    assert _claims(observer) == ["tok-old"]
    _record(old, claim)
    assert _claims(observer) == []
    assert index.run_tool_txn(observer, index.unreferenced_blobs_txn, index.now_ms() + 10**9) == []


@pytest.mark.parametrize("then", ["released", "marked", "deleted"])
def test_recording_a_path_fails_when_the_claim_was_released(
    conns: tuple[Database, Database, Database], then: str
) -> None:
    """An upload whose claim was released behind its back (by whatever cleanup) must
    fail instead of acknowledging content a deletion may take: with the claim merely
    gone, with the content marked for deletion, and with it deleted. Before the fix
    only the last failed; the first two recorded the path (``DID NOT RAISE``), the
    second on a blob whose object was being deleted."""
    upload, deletion, observer = conns
    process = _start_process(upload, "media1")
    claim = _claim(upload, process, "tok-1")
    # The claim is released behind the upload's back (a cleanup that misjudged it).
    index.run_tool_txn(deletion, index.release_claim_txn, claim.token, index.now_ms())
    if then != "released":
        [(sha, _length, gen)] = index.run_tool_txn(
            deletion, index.unreferenced_blobs_txn, index.now_ms() + 10**9
        )
        assert sha == SHA
        mark = index.run_tool_txn(deletion, index.mark_deleting_txn, SHA, gen)
        assert mark is not None
        if then == "deleted":
            assert index.run_tool_txn(deletion, index.finish_deleting_txn, SHA, mark)
    with pytest.raises(index.LostClaim):
        _record(upload, claim)
    assert index.run_tool_txn(observer, index.locate_txn, claim.path) is None


def test_the_claims_of_a_process_that_stopped_beating_are_released(
    conns: tuple[Database, Database, Database],
) -> None:
    """A boot whose heartbeat stopped (the process died mid-upload) is dead: another
    process's heartbeat releases its claims, and the content becomes garbage. Should it
    have been alive after all (stalled that long), its upload fails instead of being
    acknowledged; a boot that beats again keeps what it claims next."""
    dead, live, observer = conns
    dead_boot = _start_process(dead, "media1")
    claim = _claim(dead, dead_boot, "tok-dead")
    assert index.run_tool_txn(live, index.boot_heartbeat_txn, uuid.uuid4().hex, "media1") == 0
    assert _claims(observer) == ["tok-dead"]
    observer.execute(
        f"UPDATE {index.BOOTS} SET seen_ts = seen_ts - ? WHERE boot = ?",
        (index.BOOT_STALE_MS + 1000, dead_boot),
    )
    observer.commit()
    assert index.run_tool_txn(live, index.boot_heartbeat_txn, uuid.uuid4().hex, "media1") == 1
    assert _claims(observer) == []
    assert [r[0] for r in index.run_tool_txn(observer, index.due_blobs_txn, index.now_ms(), 10)] == [SHA]
    with pytest.raises(index.LostClaim):
        _record(dead, claim)
    # It beats again: its row is back, and its new claims are held.
    assert index.run_tool_txn(dead, index.boot_heartbeat_txn, dead_boot, "media1") == 0
    again = _claim(dead, dead_boot, "tok-again")
    assert index.run_tool_txn(live, index.release_stale_claims_txn, index.now_ms()) == 0
    _record(dead, again)
