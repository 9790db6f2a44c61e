"""Pure logic of the storage provider: paths, the index protocol, blob store, responder."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from synapse_msc3916.config import StorageConfig
from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import FileBlobStore, blob_name, sha_from_name
from synapse_msc3916.storage.responder import BlobResponder
from synapse_msc3916.storage.tools import parse_duration

SHA = "ab" * 32


def test_parse_media_path_all_kinds() -> None:
    ref = index.parse_media_path("local_content/ab/cd/efgh")
    assert ref == index.MediaRef(None, "abcdefgh")
    ref = index.parse_media_path("remote_content/example.org:8448/ab/cd/efgh")
    assert ref == index.MediaRef("example.org:8448", "abcdefgh")
    ref = index.parse_media_path("local_thumbnails/ab/cd/efgh/32-32-image-png-crop")
    assert ref == index.MediaRef(None, "abcdefgh", 32, 32, "image/png", "crop")
    ref = index.parse_media_path("remote_thumbnail/hs/ab/cd/ef/640-480-image-svg+xml-scale")
    assert ref == index.MediaRef("hs", "abcdef", 640, 480, "image/svg+xml", "scale")
    for bad in ("url_cache/2024-01-01/abc", "local_content/ab", "ab/cd/" + SHA, "", "x"):
        assert index.parse_media_path(bad) is None


def test_blob_names_round_trip() -> None:
    assert blob_name(SHA) == f"ab/ab/{SHA}"
    assert sha_from_name(blob_name(SHA)) == SHA
    assert sha_from_name("local_content/ab/cd/ef") is None
    assert sha_from_name(f"ab/cd/{SHA}") is None


def test_parse_duration() -> None:
    assert parse_duration("24h") == 86400
    assert parse_duration("0s") == 0
    assert parse_duration("90") == 90
    assert parse_duration("1.5m") == 90


def test_max_pool_connections_defaults_to_threadpool_size() -> None:
    config = StorageConfig.parse({"backend": "s3", "bucket": "media", "threadpool_size": 7})
    assert config.max_pool_connections == 7


class SqliteTxn:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.cur = conn.cursor()
        self.rowcount = -1

    def execute(self, sql: str, args: Any = ()) -> None:
        self.cur.execute(sql, tuple(args))
        self.rowcount = self.cur.rowcount

    def fetchall(self) -> list[Any]:
        return self.cur.fetchall()

    def fetchone(self) -> Any:
        return self.cur.fetchone()


@pytest.fixture
def txn() -> SqliteTxn:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(
        """
        CREATE TABLE local_media_repository (media_id TEXT, media_length INT, sha256 TEXT);
        CREATE TABLE remote_media_cache (media_origin TEXT, filesystem_id TEXT,
            media_length INT, sha256 TEXT);
        CREATE TABLE local_media_repository_thumbnails (media_id TEXT, thumbnail_width INT,
            thumbnail_height INT, thumbnail_type TEXT, thumbnail_method TEXT);
        CREATE TABLE remote_media_cache_thumbnails (media_origin TEXT, filesystem_id TEXT,
            thumbnail_width INT, thumbnail_height INT, thumbnail_type TEXT,
            thumbnail_method TEXT);
        """
    )
    t = SqliteTxn(conn)
    index.ensure_schema_txn(t)
    return t


def test_schema_is_idempotent_and_versioned(txn: SqliteTxn) -> None:
    assert index.ensure_schema_txn(txn) == index.SCHEMA_VERSION
    txn.execute(f"SELECT version FROM {index.SCHEMA} WHERE component = ?", ("dedup_storage",))
    assert txn.fetchone() == (index.SCHEMA_VERSION,)
    # A database left at an older version is upgraded in place, tables intact.
    txn.execute(f"UPDATE {index.SCHEMA} SET version = 0", ())
    assert index.ensure_schema_txn(txn) == index.SCHEMA_VERSION
    txn.execute(f"UPDATE {index.SCHEMA} SET version = 99", ())
    with pytest.raises(RuntimeError, match="newer"):
        index.ensure_schema_txn(txn)


def test_claim_protocol(txn: SqliteTxn) -> None:
    ref = index.MediaRef(None, "media1")
    assert index.claim_blob_txn(txn, SHA, 10, 1000) == (index.WRITE, False)
    # Not yet stored: a second uploader must write too (its 412 is harmless).
    assert index.claim_blob_txn(txn, SHA, 10, 1001) == (index.WRITE, False)
    index.record_path_txn(txn, "local_content/me/di/a1", SHA, 10, ref, 1002, True)
    assert index.claim_blob_txn(txn, SHA, 10, 1003) == (index.HIT, False)
    index.mark_corrupt_txn(txn, SHA)
    assert index.claim_blob_txn(txn, SHA, 10, 1004) == (index.WRITE, True)
    loc = index.locate_txn(txn, "local_content/me/di/a1")
    assert loc is not None and loc.sha256 == SHA and not loc.servable


def test_gc_never_deletes_a_blob_referenced_again(txn: SqliteTxn) -> None:
    now = index.now_ms()
    index.claim_blob_txn(txn, SHA, 10, now - 10_000)
    index.record_path_txn(
        txn, "local_content/go/ne/x", SHA, 10, index.MediaRef(None, "gonex"), now - 10_000, True
    )
    cutoff = now - 1000
    # The media row does not exist (and no tombstone table says more): an old orphan.
    assert index.orphan_paths_txn(txn, cutoff) == ["local_content/go/ne/x"]
    assert index.delete_path_txn(txn, "local_content/go/ne/x", cutoff)
    [(sha, length, gen)] = index.unreferenced_blobs_txn(txn, now + 60_000)
    assert (sha, length) == (SHA, 10)
    # An upload claims it between the scan and the mark: the mark must fail.
    claim = index.Claim("t1", "local_content/ag/ai/n", "master")
    assert index.claim_blob_txn(txn, SHA, 10, now, claim) == (index.HIT, False)
    assert index.mark_deleting_txn(txn, SHA, gen) is None
    # The claim alone keeps it out of every deletion, whatever the cutoff ...
    assert index.unreferenced_blobs_txn(txn, now + 10**9) == []
    # ... until the upload fails and releases it.
    index.release_claim_txn(txn, "t1", now)
    [(_, _, gen)] = index.unreferenced_blobs_txn(txn, now + 60_000)
    mark = index.mark_deleting_txn(txn, SHA, gen)
    assert mark is not None
    # Once marked, a new upload waits instead of trusting the object ...
    assert index.claim_blob_txn(txn, SHA, 10, now + 1)[0] == index.WAIT
    # ... and writes it afresh after the delete finished.
    assert index.finish_deleting_txn(txn, SHA, mark)
    assert index.claim_blob_txn(txn, SHA, 10, now + 2) == (index.WRITE, False)


def test_orphan_paths_respect_media_and_thumbnail_rows(txn: SqliteTxn) -> None:
    old = 1000
    txn.execute("INSERT INTO local_media_repository VALUES ('keep', 1, NULL)", ())
    txn.execute(
        "INSERT INTO local_media_repository_thumbnails VALUES ('keep', 32, 32, 'image/png',"
        " 'crop')",
        (),
    )
    txn.execute("INSERT INTO remote_media_cache VALUES ('hs', 'rkeep', 1, NULL)", ())
    rows = {
        "local_content/ke/ep/x": index.MediaRef(None, "keep"),
        "local_content/go/ne/x": index.MediaRef(None, "gone"),
        "local_thumbnails/ke/ep/x/32-32-image-png-crop": index.MediaRef(
            None, "keep", 32, 32, "image/png", "crop"
        ),
        "local_thumbnails/ke/ep/x/96-96-image-png-crop": index.MediaRef(
            None, "keep", 96, 96, "image/png", "crop"
        ),
        "remote_content/hs/rk/ee/p": index.MediaRef("hs", "rkeep"),
        "remote_content/hs/rg/on/e": index.MediaRef("hs", "rgone"),
    }
    index.claim_blob_txn(txn, SHA, 1, old)
    for path, ref in rows.items():
        index.record_path_txn(txn, path, SHA, 1, ref, old, True)
    index.record_path_txn(
        txn, "local_content/ne/w/", SHA, 1, index.MediaRef(None, "new"), 5000, True
    )
    assert index.orphan_paths_txn(txn, 2000) == [
        "local_content/go/ne/x",
        "local_thumbnails/ke/ep/x/96-96-image-png-crop",
        "remote_content/hs/rg/on/e",
    ]


def test_file_blobstore_exclusive_atomic_create(tmp_path: Path) -> None:
    store = FileBlobStore(str(tmp_path / "blobs"))
    src = tmp_path / "src"
    data = os.urandom(100_000)
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    results: list[bool] = []

    def put() -> None:
        results.append(store.put_file(sha, str(src), len(data)))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert [p.name for p in files] == [sha]  # no temp files left behind
    reader = store.open(sha)
    assert reader is not None and reader.size == len(data) and reader.read(10**6) == data
    reader.close()
    assert [i.name for i in store.list_blobs()] == [blob_name(sha)]
    store.delete(sha)
    assert store.open(sha) is None


class FakeReader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.size = len(data)
        self.reads = 0
        self.closed = False

    def read(self, n: int) -> bytes:
        self.reads += 1
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


class FakeConsumer:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.producer: Any = None
        self.unregistered = False
        self.pause_after_write = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.unregistered = True

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.pause_after_write:
            self.producer.pauseProducing()


def _responder(reader: FakeReader, sha: str | None, corrupt: list[str]) -> BlobResponder:
    return BlobResponder(
        reader=reader,
        read_in_thread=lambda f: defer.ensureDeferred(_call(f)),
        run_in_background=lambda f, *a: defer.ensureDeferred(f(*a)),
        make_yieldable=lambda d: d,
        reactor=Clock(),
        length=reader.size,
        sha256=sha,
        on_corrupt=corrupt.append,
        chunk_size=1000,
    )


async def _call(f: Any) -> Any:
    return f()


def test_responder_honours_pause_and_resume() -> None:
    data = os.urandom(3500)
    reader, consumer, corrupt = FakeReader(data), FakeConsumer(), []
    responder = _responder(reader, hashlib.sha256(data).hexdigest(), corrupt)
    consumer.pause_after_write = True
    done = defer.ensureDeferred(_wrap(responder.write_to_consumer(consumer)))
    assert len(consumer.chunks) == 1 and reader.reads == 2  # paused: one chunk read ahead, no more
    consumer.pause_after_write = False
    responder.resumeProducing()
    assert b"".join(consumer.chunks) == data
    assert consumer.unregistered and not corrupt
    assert done.called


async def _wrap(aw: Any) -> Any:
    return await aw


def test_responder_withholds_the_last_chunk_of_a_corrupt_blob() -> None:
    data = os.urandom(2500)
    reader, consumer, corrupt = FakeReader(data), FakeConsumer(), []
    responder = _responder(reader, hashlib.sha256(b"other").hexdigest(), corrupt)
    done = defer.ensureDeferred(_wrap(responder.write_to_consumer(consumer)))
    failures: list[Any] = []
    done.addErrback(failures.append)
    assert len(b"".join(consumer.chunks)) == 2000  # the final 500 bytes never went out
    assert corrupt and "SHA-256" in corrupt[0]
    assert failures


def test_responder_detects_truncation() -> None:
    reader, consumer, corrupt = FakeReader(b"x" * 1500), FakeConsumer(), []
    responder = _responder(reader, None, corrupt)
    reader.size = 1500
    reader.data = b"x" * 1200  # the object is shorter than it claims
    done = defer.ensureDeferred(_wrap(responder.write_to_consumer(consumer)))
    done.addErrback(lambda f: None)
    assert corrupt and "truncated" in corrupt[0]


def test_gc_orphan_sweep_merges_in_bounded_pages(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Objects without a blob row are found by a merge of two sorted lists, page by page."""
    import hashlib as _hashlib
    import sqlite3 as _sqlite3

    from synapse_msc3916.homeserver_config import Database
    from synapse_msc3916.storage import index as _index
    from synapse_msc3916.storage import tools
    from synapse_msc3916.storage.blobstore import ObjectInfo, blob_name

    monkeypatch.setattr(tools, "_PAGE", 3)
    db = Database(_sqlite3.connect(":memory:"), "sqlite")
    _index.run_tool_txn(db, _index.ensure_schema_txn)
    shas = sorted(_hashlib.sha256(bytes([i])).hexdigest() for i in range(20))
    known = set(shas[::3]) | {shas[-1]}
    for sha in known:
        db.execute(
            f"INSERT INTO {_index.BLOBS} (sha256, length, stored, corrupt, created_ts, last_ref_ts)"
            " VALUES (?, 1, 1, 0, 0, 0)",
            (sha,),
        )
    db.commit()

    class Store:
        def list_blobs(self):  # type: ignore[no-untyped-def]
            return iter([ObjectInfo(blob_name(s), 1, 0.0) for s in shas])

    found = [sha for sha, _ in tools._objects_without_row(db, Store())]
    assert found == [s for s in shas if s not in known]


def test_responder_streams_a_prefetched_small_blob_without_reading_again() -> None:
    data = os.urandom(800)
    reader, consumer, corrupt = FakeReader(data), FakeConsumer(), []
    reader.pos = len(data)  # the provider already read it whole while opening
    responder = BlobResponder(
        reader=reader,
        read_in_thread=lambda f: defer.ensureDeferred(_call(f)),
        run_in_background=lambda f, *a: defer.ensureDeferred(f(*a)),
        make_yieldable=lambda d: d,
        reactor=Clock(),
        length=len(data),
        sha256=hashlib.sha256(b"other").hexdigest(),
        on_corrupt=corrupt.append,
        chunk_size=1000,
        prefetched=(data, hashlib.sha256(data)),
    )
    done = defer.ensureDeferred(_wrap(responder.write_to_consumer(consumer)))
    done.addErrback(lambda f: None)
    assert reader.reads == 0
    assert consumer.chunks == [] and corrupt and "SHA-256" in corrupt[0]  # still verified


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal() -> None:
    import io

    from synapse_msc3916.storage.progress import Progress

    out = io.StringIO()
    bar = Progress("scrub", 3, unit="object", stream=out)
    for _ in range(3):
        bar.step()
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert "scrub: 100%" in text and "3/3" in text
    assert all(line.startswith("scrub:") for line in text.splitlines())


def test_file_blobstore_fsyncs_the_object_and_every_directory_it_creates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored object survives a power loss: the file, the directory entry that names it
    and the directories created for it are all fsynced before ``put_file`` returns.

    Before the fix only the temporary file was fsynced (``synced`` held one regular
    file, no directory), so the link into place could be lost with the index saying
    "stored".
    """
    import stat as _stat

    root = tmp_path / "blobs"
    root.mkdir()
    store = FileBlobStore(str(root))
    src = tmp_path / "src"
    data = os.urandom(5000)
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        # Which inode was synced: identify it by (device, inode) later.
        synced.append((f"{st.st_dev}:{st.st_ino}", _stat.S_ISDIR(st.st_mode)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert store.put_file(sha, str(src), len(data)) is True

    def ident(p: Path) -> tuple[str, bool]:
        st = os.stat(p)
        return f"{st.st_dev}:{st.st_ino}", _stat.S_ISDIR(st.st_mode)

    final = root / blob_name(sha)
    # The object's bytes, the directory holding its name, and the parents of the two
    # directories created for it (ab/ in the root, cd/ in ab/).
    for needed in (final, final.parent, final.parent.parent, root):
        assert ident(needed) in synced, (needed, synced)

    # An overwrite (healing a corrupt object) renames over the old name: synced too.
    synced.clear()
    assert store.put_file(sha, str(src), len(data), overwrite=True) is True
    assert ident(final) in synced and ident(final.parent) in synced


def test_file_blobstore_delete_failure_is_a_storage_error(tmp_path: Path) -> None:
    """A delete the file system refuses is ``StorageUnavailable`` (what the deletion job
    and ``gc`` handle), not a raw ``OSError``; a missing object is not an error.
    Before the fix: ``IsADirectoryError`` escaped."""
    from synapse_msc3916.storage.blobstore import StorageUnavailable

    store = FileBlobStore(str(tmp_path / "blobs"))
    store.delete(SHA)  # missing: fine
    blocker = tmp_path / "blobs" / blob_name(SHA)
    blocker.mkdir(parents=True)
    (blocker / "x").write_bytes(b"x")
    with pytest.raises(StorageUnavailable, match="cannot delete"):
        store.delete(SHA)


def test_migrate_reads_remote_rows_once_per_origin() -> None:
    """Remote files are matched to Synapse's rows by filesystem_id from one read of a
    page of the origin's rows (no per-file scan); local ones by media_id."""
    from synapse_msc3916.homeserver_config import Database
    from synapse_msc3916.storage.tools import SynapseRows

    conn = sqlite3.connect(":memory:")
    conn.executescript(
        """
        CREATE TABLE local_media_repository (media_id TEXT, media_length INT, sha256 TEXT);
        CREATE TABLE local_media_repository_thumbnails (media_id TEXT, thumbnail_width INT,
            thumbnail_height INT, thumbnail_type TEXT, thumbnail_method TEXT,
            thumbnail_length INT);
        CREATE TABLE remote_media_cache (media_origin TEXT, media_id TEXT, filesystem_id TEXT,
            media_length INT, sha256 TEXT);
        CREATE TABLE remote_media_cache_thumbnails (media_origin TEXT, media_id TEXT,
            filesystem_id TEXT, thumbnail_width INT, thumbnail_height INT,
            thumbnail_type TEXT, thumbnail_method TEXT, thumbnail_length INT);
        INSERT INTO local_media_repository VALUES ('m1', 10, 'aa');
        INSERT INTO local_media_repository_thumbnails VALUES ('m1', 32, 32, 'image/png', 'crop', 5);
        INSERT INTO remote_media_cache VALUES ('a', 'r1', 'f1', 20, 'bb'), ('b', 'r1', 'f1', 21, NULL);
        INSERT INTO remote_media_cache_thumbnails VALUES ('a', 'r1', 'f1', 32, 32, 'image/png', 'crop', 7);
        """
    )
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    db = Database(conn, "sqlite")
    rows = SynapseRows(True)
    thumb = ("image/png", "crop")
    assert rows.length(db, index.MediaRef(None, "m1")) == 10
    assert rows.sha256(db, index.MediaRef(None, "m1")) == ("aa", 10)
    assert rows.length(db, index.MediaRef(None, "m1", 32, 32, *thumb)) == 5
    assert rows.length(db, index.MediaRef(None, "m1", 64, 64, *thumb)) is None
    statements.clear()
    assert rows.length(db, index.MediaRef("a", "f1")) == 20
    assert rows.sha256(db, index.MediaRef("a", "f1")) == ("bb", 20)
    assert rows.length(db, index.MediaRef("a", "nope")) is None
    assert len([s for s in statements if "remote_media_cache" in s]) == 1  # one read of 'a'
    assert rows.length(db, index.MediaRef("a", "f1", 32, 32, *thumb)) == 7
    assert rows.length(db, index.MediaRef("b", "f1")) == 21
    assert rows.sha256(db, index.MediaRef("b", "f1")) is None
    assert rows.sha256(db, index.MediaRef("b", "f1", 32, 32, *thumb)) is None


def test_running_totals_equal_a_recount_on_sqlite(txn: SqliteTxn) -> None:
    """``stats`` reads totals the triggers keep (schema step ``index.TOTALS_VERSION``) instead of scanning; on
    SQLite they are six triggers of their own, checked here against a full recount
    after every kind of change the index makes. (On PostgreSQL, with concurrent
    writers: tests/test_storage_totals_postgres.py.)"""
    other = "cd" * 32

    def exact() -> tuple[int, ...]:
        totals = index.totals_txn(txn)
        assert totals == index.count_totals_txn(txn)
        return totals

    def store(path: str, sha256: str, length: int) -> None:
        claim = index.Claim(path, path, "test")
        index.claim_blob_txn(txn, sha256, length, 1000, claim)
        index.record_path_txn(
            txn, path, sha256, length, index.parse_media_path(path) or index.MediaRef(None, "x"),
            1000, True, claim,
        )

    store("local_content/aa/bb/one", SHA, 100)
    store("local_content/aa/bb/two", SHA, 100)
    assert exact() == (2, 200, 1, 100, 0)
    store("local_content/aa/bb/two", other, 40)  # the same path stored with other bytes
    assert exact() == (2, 140, 2, 140, 0)
    index.mark_corrupt_txn(txn, other)
    assert exact() == (2, 140, 2, 140, 1)
    assert index.delete_path_txn(txn, "local_content/aa/bb/two", 10**15)
    [(sha256, _length, gen)] = index.due_blobs_txn(txn, 10**15, 10)
    mark = index.mark_deleting_txn(txn, sha256, gen)
    assert mark is not None
    assert index.finish_deleting_txn(txn, sha256, mark)
    assert exact() == (1, 100, 1, 100, 0)
    assert index.compact_totals_txn(txn) > 1
    txn.execute(f"SELECT COUNT(*) FROM {index.TOTALS}", ())
    assert txn.fetchone()[0] == 1
    stats = index.stats_txn(txn)
    assert (stats["paths"], stats["objects"], stats["logical_bytes"]) == (1, 1, 100)
    # An index from before the totals is counted once when the step creates them.
    txn.execute(f"DROP TABLE {index.TOTALS}", ())
    txn.execute(f"UPDATE {index.SCHEMA} SET version = {index.TOTALS_VERSION - 1}", ())
    index.ensure_schema_txn(txn)
    assert exact() == (1, 100, 1, 100, 0)
    txn.execute(f"SELECT COUNT(*) FROM {index.TOTALS}", ())
    assert txn.fetchone()[0] == 1


def test_storage_config_repr_hides_secrets() -> None:
    """Issue 18 item 16: a logged or printed StorageConfig must not leak credentials.

    Before the fix the repr showed all three values (the assertions below failed on the
    secret access key first)."""
    config = StorageConfig.parse({
        "backend": "s3", "bucket": "media", "access_key_id": "AKIAVISIBLE",
        "secret_access_key": "s3cr3t-access-key", "session_token": "s3cr3t-session",
        "sse_customer_key": "s3cr3t-sse-customer-key-32-bytes",
    })
    text = repr(config)
    for secret in ("s3cr3t-access-key", "s3cr3t-session", "s3cr3t-sse-customer-key-32-bytes"):
        assert secret not in text
    assert "AKIAVISIBLE" in text and "bucket='media'" in text  # the rest still shows
    assert config.secret_access_key == "s3cr3t-access-key"  # only hidden, not dropped


def test_responder_reads_nothing_for_a_head_request() -> None:
    """A HEAD answer has no body (Twisted drops it): the object is not read for it."""
    data = os.urandom(3500)
    reader, consumer, corrupt = FakeReader(data), FakeConsumer(), []
    consumer.method = b"HEAD"  # type: ignore[attr-defined]
    responder = _responder(reader, hashlib.sha256(data).hexdigest(), corrupt)
    done = defer.ensureDeferred(_wrap(responder.write_to_consumer(consumer)))
    assert done.called and reader.reads == 0 and consumer.chunks == [] and not corrupt


def test_remote_rows_are_read_in_pages_and_never_all_held() -> None:
    """``migrate``'s view of Synapse's remote rows: every lookup answers as the whole table
    would, while at most two pages are held, however many rows the origin has.

    Before, each worker read all of an origin's rows at once (``remote_rows_txn``):
    0.3-0.4 KiB a media, gigabytes for 10^6 media of one origin across 16 workers; this
    test's ``rows_held`` was then the whole origin (AttributeError on old code: no pages).
    """
    import random

    from synapse_msc3916.homeserver_config import Database
    from synapse_msc3916.storage.tools import SynapseRows

    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.executescript(
        "CREATE TABLE remote_media_cache (media_origin TEXT, media_id TEXT,"
        " filesystem_id TEXT, media_length INTEGER, sha256 TEXT);"
        "CREATE TABLE remote_media_cache_thumbnails (media_origin TEXT, media_id TEXT,"
        " filesystem_id TEXT, thumbnail_width INTEGER, thumbnail_height INTEGER,"
        " thumbnail_type TEXT, thumbnail_method TEXT, thumbnail_length INTEGER);"
    )
    rng = random.Random(5)
    fids = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ") for _ in range(24))
                   for _ in range(300)})
    media = {fid: (rng.randint(1, 10**6), hashlib.sha256(fid.encode()).hexdigest()) for fid in fids}
    for origin in ("a.example", "b.example"):  # a second origin's rows must never answer
        for fid, (length, sha) in media.items():
            conn.execute("INSERT INTO remote_media_cache VALUES (?, ?, ?, ?, ?)",
                         (origin, "m" + fid, fid, length if origin == "a.example" else 1, sha))
    thumbs: dict[tuple[Any, ...], int] = {}
    for n, fid in enumerate(fids):
        # One media with more thumbnails than a page holds, the others with 0-2.
        for t in range(12 if n == 40 else n % 3):
            key = (fid, 32 * (t + 1), 32, "image/png", "scale")
            thumbs[key] = rng.randint(1, 5000)
            conn.execute("INSERT INTO remote_media_cache_thumbnails VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         ("a.example", "m" + fid, *key, thumbs[key]))
    conn.commit()
    db = Database(conn, "sqlite")
    page = 10
    rows = SynapseRows(True, page_size=page)

    def ref(fid: str, thumb: tuple[Any, ...] | None = None) -> index.MediaRef:
        if thumb is None:
            return index.MediaRef("a.example", fid)
        return index.MediaRef("a.example", fid, *thumb[1:])

    # Files in listing order, with the jitter of 4 workers taking them in turns.
    order = list(fids)
    for i in range(0, len(order) - 3, 3):
        order[i], order[i + 2] = order[i + 2], order[i]
    most = 0
    for fid in order:
        assert rows.sha256(db, ref(fid)) == (media[fid][1], media[fid][0])
        assert rows.length(db, ref(fid)) == media[fid][0]
        most = max(most, rows.rows_held)
    assert most <= 2 * page
    assert rows.length(db, index.MediaRef("a.example", "zzzz-not-there")) is None
    for key in sorted(thumbs):
        assert rows.length(db, ref(key[0], key)) == thumbs[key], key
        most = max(most, rows.rows_held)
    assert most <= 12 + page  # the media with 12 thumbnails is a page of its own
    assert rows.length(db, ref(fids[0], (fids[0], 1, 1, "image/png", "crop"))) is None
