"""The deletion lifecycle on SQLite, without Synapse: triggers, tombstones, delete_after."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from synapse_msc3916.config import ConfigError, StorageConfig
from synapse_msc3916.storage import index
from synapse_msc3916.synapse_adapter import media_deletions
from tests.test_storage_unit import SqliteTxn

SHA_A, SHA_B = "aa" * 32, "bb" * 32


@pytest.fixture
def txn() -> SqliteTxn:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(
        """
        CREATE TABLE local_media_repository (media_id TEXT, media_length INT, sha256 TEXT);
        CREATE TABLE remote_media_cache (media_origin TEXT, media_id TEXT, filesystem_id TEXT,
            media_length INT, sha256 TEXT);
        CREATE TABLE local_media_repository_thumbnails (media_id TEXT, thumbnail_width INT,
            thumbnail_height INT, thumbnail_type TEXT, thumbnail_method TEXT);
        CREATE TABLE remote_media_cache_thumbnails (media_origin TEXT, media_id TEXT,
            filesystem_id TEXT, thumbnail_width INT, thumbnail_height INT, thumbnail_type TEXT,
            thumbnail_method TEXT);
        """
    )
    t = SqliteTxn(conn)
    index.ensure_schema_txn(t)
    assert len(media_deletions.ensure_deletion_triggers_txn(t)) == 4
    assert media_deletions.ensure_deletion_triggers_txn(t) == []  # idempotent
    index.note_tombstones_since_txn(t, 0)
    return t


def _store(txn: SqliteTxn, path: str, sha: str, ref: index.MediaRef, now: int = 1000) -> None:
    claim = index.Claim(path, path, "master")
    index.claim_blob_txn(txn, sha, 1, now, claim)
    index.record_path_txn(txn, path, sha, 1, ref, now, True, claim)


def test_delete_after_parsing() -> None:
    base = {"backend": "file", "directory": "/tmp/x"}
    assert StorageConfig.parse(base).delete_after_ms == 24 * 3600 * 1000
    assert StorageConfig.parse({**base, "delete_after": "0s"}).delete_after_ms == 0
    assert StorageConfig.parse({**base, "delete_after": "90m"}).delete_after_ms == 90 * 60_000
    assert StorageConfig.parse({**base, "delete_after": 30}).delete_after_ms == 30_000
    assert StorageConfig.parse({**base, "delete_after": None}).delete_after_ms is None
    s3 = {"backend": "s3", "bucket": "media", "delete_after": "7d"}
    assert StorageConfig.parse(s3).delete_after_ms == 7 * 86_400_000
    for bad in ("soon", "-1s", -5, True, "1x", [1]):
        with pytest.raises(Exception, match="^synapse_msc3916: delete_after: "):
            StorageConfig.parse({**base, "delete_after": bad})


def test_a_deleted_media_and_its_thumbnails_unreference_their_content(txn: SqliteTxn) -> None:
    txn.execute("INSERT INTO local_media_repository VALUES ('m1', 1, NULL), ('m2', 1, NULL)", ())
    txn.execute(
        "INSERT INTO local_media_repository_thumbnails VALUES ('m1', 32, 32, 'image/png', 'crop')", ()
    )
    _store(txn, "local_content/m1", SHA_A, index.MediaRef(None, "m1"))
    _store(txn, "local_content/m2", SHA_A, index.MediaRef(None, "m2"))
    _store(txn, "local_thumbnails/m1/32-32-image-png-crop", SHA_B,
           index.MediaRef(None, "m1", 32, 32, "image/png", "crop"))
    # What Synapse's admin delete does, in its own transaction.
    txn.execute("DELETE FROM local_media_repository WHERE media_id = 'm1'", ())
    txn.execute("DELETE FROM local_media_repository_thumbnails WHERE media_id = 'm1'", ())
    batch = index.apply_tombstones_txn(txn, 5000)
    assert (batch.tombstones, batch.paths_removed, batch.blobs_unreferenced) == (2, 2, 1)
    # The thumbnail's content is garbage; the shared original's is still used by m2.
    assert [d[:2] for d in index.due_blobs_txn(txn, 5000)] == [(SHA_B, 1)]
    assert index.due_blobs_txn(txn, 4999) == []  # delete_after not over yet
    txn.execute(f"SELECT COUNT(*) FROM {index.TOMBSTONES}", ())
    assert txn.fetchone() == (0,)
    # The shared one goes when its last media goes.
    txn.execute("DELETE FROM local_media_repository WHERE media_id = 'm2'", ())
    index.apply_tombstones_txn(txn, 6000)
    assert [d[0] for d in index.due_blobs_txn(txn, 6000)] == [SHA_B, SHA_A]


def test_a_reupload_before_the_job_keeps_the_content(txn: SqliteTxn) -> None:
    txn.execute("INSERT INTO remote_media_cache VALUES ('hs', 'r1', 'f1', 1, NULL)", ())
    _store(txn, "remote_content/hs/f1", SHA_A, index.MediaRef("hs", "f1"))
    txn.execute("DELETE FROM remote_media_cache", ())  # purge_media_cache
    index.apply_tombstones_txn(txn, 5000)
    [(sha, _, gen)] = index.due_blobs_txn(txn, 5000)
    # The same content arrives again before the job marks it: the mark must fail.
    _store(txn, "local_content/new", SHA_A, index.MediaRef(None, "new"), now=5001)
    assert index.mark_deleting_txn(txn, sha, gen) is None
    assert index.due_blobs_txn(txn, 10**12) == []


def test_a_row_deleted_and_written_again_keeps_its_path(txn: SqliteTxn) -> None:
    txn.execute("INSERT INTO local_media_repository VALUES ('m1', 1, NULL)", ())
    _store(txn, "local_content/m1", SHA_A, index.MediaRef(None, "m1"))
    txn.execute("DELETE FROM local_media_repository", ())
    txn.execute("INSERT INTO local_media_repository VALUES ('m1', 1, NULL)", ())
    assert index.apply_tombstones_txn(txn, 5000).paths_removed == 0
    assert index.due_blobs_txn(txn, 10**12) == []


def test_gc_trusts_tombstones_for_paths_indexed_after_them(txn: SqliteTxn) -> None:
    """A fresh path with no media row is an upload in flight, whatever the grace."""
    now = index.now_ms()
    txn.execute(f"UPDATE {index.STATE} SET value = ?", (now - 10_000,))
    _store(txn, "local_content/old", SHA_A, index.MediaRef(None, "old"), now=now - 20_000)
    _store(txn, "local_content/new", SHA_B, index.MediaRef(None, "new"), now=now - 5_000)
    assert index.orphan_paths_txn(txn, now) == ["local_content/old"]
    stale = now - index.UNEXPLAINED_PATH_MIN_AGE_MS - 1
    txn.execute(f"UPDATE {index.PATHS} SET created_ts = ? WHERE path = 'local_content/new'", (stale,))
    assert index.orphan_paths_txn(txn, now) == ["local_content/new", "local_content/old"]


def test_claims_of_a_stopped_boot_are_released(txn: SqliteTxn) -> None:
    """By boot, not by instance name (see test_storage_claims_postgres for the surge)."""
    assert index.boot_heartbeat_txn(txn, "boot1", "media1") == 0
    assert index.boot_heartbeat_txn(txn, "boot2", "media1") == 0
    index.claim_blob_txn(txn, SHA_A, 1, 1000, index.Claim("t1", "p1", "media1", "boot1"))
    index.claim_blob_txn(txn, SHA_B, 1, 1000, index.Claim("t2", "p2", "media1", "boot2"))
    txn.execute(
        f"UPDATE {index.BOOTS} SET seen_ts = seen_ts - ? WHERE boot = 'boot1'",
        (index.BOOT_STALE_MS + 1,),
    )
    assert index.boot_heartbeat_txn(txn, "boot2", "media1") == 1
    assert [d[0] for d in index.due_blobs_txn(txn, index.now_ms())] == [SHA_A]


def test_gc_dry_run_counts_what_apply_does_without_writing(txn: SqliteTxn) -> None:
    """The read-only dry run predicts the index work of ``gc --grace 0 --apply``:
    tombstoned paths, the contents they and stale claims leave unreferenced, contents
    already unreferenced; a content another path still uses stays."""
    from synapse_msc3916.homeserver_config import Database
    from synapse_msc3916.storage import tools

    sha_c, sha_d = "cc" * 32, "dd" * 32
    now = index.now_ms()
    txn.execute("INSERT INTO local_media_repository VALUES ('m1', 1, NULL), ('m2', 1, NULL),"
                " ('m3', 1, NULL)", ())
    _store(txn, "local_content/m1", SHA_A, index.MediaRef(None, "m1"), now)
    _store(txn, "local_content/m2", SHA_B, index.MediaRef(None, "m2"), now)
    _store(txn, "local_content/m3", SHA_B, index.MediaRef(None, "m3"), now)
    index.claim_blob_txn(txn, sha_c, 1, now - index.CLAIM_STALE_MS - 1, index.Claim("t", "p", "i"))
    index.claim_blob_txn(txn, sha_d, 1, now - 10, None)
    index._mark_unreferenced_txn(txn, [sha_d], now - 10)
    txn.execute("DELETE FROM local_media_repository WHERE media_id IN ('m1', 'm2')", ())

    def snapshot() -> list[Any]:
        out = []
        for table in (index.PATHS, index.BLOBS, index.CLAIMS, index.TOMBSTONES):
            txn.execute(f"SELECT * FROM {table} ORDER BY 1", ())
            out.append(txn.fetchall())
        return out

    before = snapshot()
    stats: dict[str, Any] = {"paths_removed": 0, "objects_deleted": 0, "bytes_freed": 0,
                             "deleted": []}
    tools._gc_dry_run(Database(txn.conn, "sqlite"), now, now, 0, stats)
    deleted = stats["deleted"]
    assert snapshot() == before
    assert stats["paths_removed"] == 2 and sorted(deleted) == [SHA_A, sha_c, sha_d]

    # What --apply then does.
    index.release_stale_claims_txn(txn, now)
    assert index.apply_tombstones_txn(txn, now).paths_removed == 2
    assert [b[0] for b in index.unreferenced_blobs_txn(txn, index.now_ms())] == sorted(deleted)


def test_remote_tombstones_use_the_media_id(txn: SqliteTxn) -> None:
    """Remote tombstones carry Synapse's media_id (the key of its unique index) and
    remove the original's and its thumbnails' paths; a row written again keeps its path;
    a tombstone from before media_id was recorded (v1 triggers) still works."""
    thumb = index.MediaRef("hs", "f1", 32, 32, "image/png", "crop")
    txn.execute("INSERT INTO remote_media_cache VALUES ('hs', 'r1', 'f1', 1, NULL)", ())
    txn.execute(
        "INSERT INTO remote_media_cache_thumbnails VALUES ('hs', 'r1', 'f1', 32, 32,"
        " 'image/png', 'crop')", ()
    )
    _store(txn, "remote_content/hs/f1", SHA_A, index.MediaRef("hs", "f1"))
    _store(txn, "remote_thumbnail/hs/f1/32-32-image-png-crop", SHA_B, thumb)
    txn.execute("DELETE FROM remote_media_cache_thumbnails", ())
    txn.execute(
        "INSERT INTO remote_media_cache_thumbnails VALUES ('hs', 'r1', 'f1', 32, 32,"
        " 'image/png', 'crop')", ()
    )
    txn.execute(f"SELECT media_origin, file_id, media_id FROM {index.TOMBSTONES}", ())
    assert txn.fetchall() == [("hs", "f1", "r1")]
    assert index.apply_tombstones_txn(txn, 5000).paths_removed == 0
    txn.execute("DELETE FROM remote_media_cache", ())
    txn.execute("DELETE FROM remote_media_cache_thumbnails", ())
    assert index.apply_tombstones_txn(txn, 5000).paths_removed == 2

    _store(txn, "remote_content/hs/f2", SHA_A, index.MediaRef("hs", "f2"))
    txn.execute(
        f"INSERT INTO {index.TOMBSTONES} (media_origin, file_id, deleted_ts) VALUES ('hs', 'f2', 1)",
        (),
    )
    assert index.apply_tombstones_txn(txn, 6000).paths_removed == 1


def test_v1_triggers_are_replaced(txn: SqliteTxn) -> None:
    """A database of an earlier release: its v1 triggers (no media_id) are dropped."""
    for table, *_ in media_deletions.MEDIA_TABLES:
        txn.execute(f"DROP TRIGGER {media_deletions.trigger_name(table)}", ())
        txn.execute(
            f"CREATE TRIGGER msc3916_tombstone_v1_{table} AFTER DELETE ON {table}"
            " FOR EACH ROW BEGIN SELECT 1; END", ()
        )
    assert len(media_deletions.ensure_deletion_triggers_txn(txn)) == 4
    txn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        f" AND tbl_name NOT IN ('{index.PATHS}', '{index.BLOBS}') ORDER BY name",  # totals' own
        (),
    )
    assert [r[0] for r in txn.fetchall()] == sorted(
        media_deletions.trigger_name(t) for t, *_ in media_deletions.MEDIA_TABLES
    )


def test_delete_jobs_parsing() -> None:
    """``delete_jobs``: batches the deletion job deletes at once; by default the tools'
    ``--jobs`` default for the backend. Before it existed:
    ``AttributeError: 'StorageConfig' object has no attribute 'delete_jobs'``."""
    file = {"backend": "file", "directory": "/tmp/x"}
    s3 = {"backend": "s3", "bucket": "media"}
    assert StorageConfig.parse(file).delete_jobs == 4
    assert StorageConfig.parse(s3).delete_jobs == 16
    assert StorageConfig.parse({**s3, "delete_jobs": 1}).delete_jobs == 1
    assert StorageConfig.parse({**file, "delete_jobs": 32}).delete_jobs == 32
    assert StorageConfig.parse({**s3, "delete_jobs": None}).delete_jobs == 16
    for bad in (0, -3, "many", True, 1.5, 10_000):
        for base in (file, s3):
            with pytest.raises(ConfigError, match="^synapse_msc3916: delete_jobs: must be "):
                StorageConfig.parse({**base, "delete_jobs": bad})
