"""The running totals behind ``stats`` on PostgreSQL, interleavings forced by hand.

``stats`` used to count paths and blobs with full scans (4.9 s at 10^6 paths, B7); it
now reads totals that triggers keep (schema step ``index.TOTALS_VERSION``). What can go wrong with totals is
counting a change twice or never: two writers at once, a compaction while writers are
in flight, two compactions at once, and the step that starts the totals from a scan of
rows that writers are still changing. Each test holds transactions open on separate
sessions, checks that the second one really waited (``pg_stat_activity``: waiting on a
lock) where it must, and compares the totals with a full recount.
"""
# ruff: noqa: F811 (the fixtures imported from the claims tests are parameters here)

from __future__ import annotations

from collections.abc import Iterator

import pytest

from synapse_msc3916.homeserver_config import Database
from synapse_msc3916.storage import index
from tests.harness_workers import PostgreSQL
from tests.test_storage_claims_postgres import (  # noqa: F401
    _Background,
    _wait_until,
    _waiting_on_lock,
    conns,
    dbname,
    postgres,
)

SHA_A = "a1" * 32
SHA_B = "b2" * 32


def _store(db: Database, path: str, sha256: str, length: int, media_id: str) -> None:
    """One upload as the provider does it, left uncommitted: claim, then record."""
    txn = index.ToolTxn(db)
    now = index.now_ms()
    claim = index.Claim(f"tok-{media_id}", path, "test")
    index.claim_blob_txn(txn, sha256, length, now, claim)
    index.record_path_txn(txn, path, sha256, length, index.MediaRef(None, media_id), now, True, claim)


def _exact(db: Database) -> tuple[int, int, int, int, int]:
    totals = index.run_tool_txn(db, index.totals_txn)
    assert totals == index.run_tool_txn(db, index.count_totals_txn)
    return totals


def _rows(db: Database) -> int:
    count = int(db.query(f"SELECT COUNT(*) FROM {index.TOTALS}")[0][0])
    db.commit()
    return count


def test_concurrent_stores_of_one_content_are_counted_once_each(
    conns: tuple[Database, Database, Database],
) -> None:
    first, second, observer = conns
    _store(first, "local_content/aa/aa/one", SHA_A, 100, "one")
    # The second upload of the same content waits on the first's blob row lock.
    waiting = _Background(lambda: _store(second, "local_content/aa/aa/two", SHA_A, 100, "two"))
    _wait_until(lambda: _waiting_on_lock(observer, second), "the second store waits on the first")
    first.commit()
    waiting.join()
    second.commit()
    # Two paths, one object: 200 logical bytes, 100 stored.
    assert _exact(observer) == (2, 200, 1, 100, 0)


def test_a_rolled_back_store_leaves_the_totals_alone(
    conns: tuple[Database, Database, Database],
) -> None:
    first, _second, observer = conns
    _store(first, "local_content/aa/aa/one", SHA_A, 100, "one")
    first.conn.rollback()
    assert _exact(observer) == (0, 0, 0, 0, 0)


def test_a_compaction_keeps_changes_not_yet_committed(
    conns: tuple[Database, Database, Database],
) -> None:
    """A store in flight (its change rows invisible) while the job folds the rows."""
    writer, compactor, observer = conns
    index.run_tool_txn(writer, lambda t: _store(writer, "local_content/aa/aa/one", SHA_A, 100, "one"))
    _store(writer, "local_content/bb/bb/two", SHA_B, 50, "two")  # in flight
    assert index.run_tool_txn(compactor, index.compact_totals_txn) >= 2
    writer.commit()
    assert _exact(observer) == (2, 150, 2, 150, 0)
    index.run_tool_txn(compactor, index.compact_totals_txn)
    assert _rows(observer) == 1
    assert _exact(observer) == (2, 150, 2, 150, 0)


def test_two_compactions_at_once_fold_each_row_once(
    conns: tuple[Database, Database, Database],
) -> None:
    first, second, observer = conns
    index.run_tool_txn(first, lambda t: _store(first, "local_content/aa/aa/one", SHA_A, 100, "one"))
    index.run_tool_txn(first, lambda t: _store(first, "local_content/bb/bb/two", SHA_B, 50, "two"))
    assert _rows(observer) >= 4
    # The first compaction has deleted the rows and written their sum, not committed.
    assert index.compact_totals_txn(index.ToolTxn(first)) >= 4
    # The second one waits on the rows the first deleted ...
    waiting = _Background(lambda: index.compact_totals_txn(index.ToolTxn(second)))
    _wait_until(lambda: _waiting_on_lock(observer, second), "the second compaction waits")
    first.commit()
    # ... and then skips them: only the first one's sum row is left to it, or nothing.
    waiting.join()
    second.commit()
    # Before: a compaction that read the sum, then deleted and wrote it (fine on SQLite,
    # which serialises writers) wrote the sum twice here: totals (4, 300, 4, 300, 0).
    assert _exact(observer) == (2, 150, 2, 150, 0)
    assert _rows(observer) == 1


def test_deletions_and_gc_marks_keep_the_totals_exact(
    conns: tuple[Database, Database, Database],
) -> None:
    db, _other, observer = conns
    index.run_tool_txn(db, lambda t: _store(db, "local_content/aa/aa/one", SHA_A, 100, "one"))
    index.run_tool_txn(db, lambda t: _store(db, "local_content/aa/aa/two", SHA_A, 100, "two"))
    index.run_tool_txn(db, lambda t: _store(db, "local_content/bb/bb/thr", SHA_B, 50, "thr"))
    index.run_tool_txn(db, index.mark_corrupt_txn, SHA_B)
    assert _exact(observer) == (3, 250, 2, 150, 1)
    # Synapse deletes "thr": the tombstone removes its path, the job deletes its blob.
    db.execute(
        f"INSERT INTO {index.TOMBSTONES} (media_origin, file_id, deleted_ts) VALUES (NULL, 'thr', 1)"
    )
    db.commit()
    assert index.run_tool_txn(db, index.apply_tombstones_txn, index.now_ms()).paths_removed == 1
    [(sha256, _length, gen)] = index.run_tool_txn(db, index.due_blobs_txn, index.now_ms(), 10)
    mark = index.run_tool_txn(db, index.mark_deleting_txn, sha256, gen)
    assert mark is not None
    assert index.run_tool_txn(db, index.finish_deleting_txn, sha256, mark)
    assert _exact(observer) == (2, 200, 1, 100, 0)
    stats = index.run_tool_txn(observer, index.stats_txn, 10)
    assert (stats["paths"], stats["objects"], stats["saved_bytes"]) == (2, 1, 100)


@pytest.fixture
def old_index(postgres: PostgreSQL, dbname: str) -> Iterator[str]:
    """An index at the schema version before the totals, holding two paths."""
    db = Database(postgres.connect(dbname), "postgres")
    index.run_tool_txn(db, lambda t: _store(db, "local_content/aa/aa/one", SHA_A, 100, "one"))
    index.run_tool_txn(db, lambda t: _store(db, "local_content/aa/aa/two", SHA_A, 100, "two"))
    for table in (index.PATHS, index.BLOBS):
        db.execute(f"DROP TRIGGER msc3916_storage_totals_{table.rsplit('_', 1)[1]} ON {table}")
    db.execute(f"DROP TABLE {index.TOTALS}")
    db.execute(f"UPDATE {index.SCHEMA} SET version = {index.TOTALS_VERSION - 1}")
    db.commit()
    db.close()
    yield dbname


def test_the_upgrade_counts_rows_being_written_exactly_once(
    old_index: str, conns: tuple[Database, Database, Database],
) -> None:
    """A store in flight while a process upgrades the schema: the step's scan must
    neither miss its rows (committed after the scan) nor count them twice (once in the
    scan and again by the trigger). The step waits for it to commit, then scans."""
    writer, upgrader, observer = conns
    _store(writer, "local_content/bb/bb/thr", SHA_B, 50, "thr")  # in flight, no trigger yet
    upgrading = _Background(lambda: index.run_tool_txn(upgrader, index.ensure_schema_txn))
    _wait_until(lambda: _waiting_on_lock(observer, upgrader), "the upgrade waits for the writer")
    writer.commit()
    assert upgrading.join() == index.SCHEMA_VERSION
    assert _exact(observer) == (3, 250, 2, 150, 0)
    # And the triggers it created count from then on.
    index.run_tool_txn(writer, lambda t: _store(writer, "local_content/cc/cc/fou", SHA_B, 50, "fou"))
    assert _exact(observer) == (4, 300, 2, 150, 0)


def test_the_upgrade_refuses_to_scan_at_repeatable_read(
    old_index: str, conns: tuple[Database, Database, Database],
) -> None:
    """At REPEATABLE READ the scan would see the transaction's first snapshot, not the
    rows committed while it waited for the lock: the step refuses instead."""
    _writer, upgrader, observer = conns
    upgrader.conn.set_session(isolation_level="REPEATABLE READ")
    with pytest.raises(RuntimeError, match="READ COMMITTED"):
        index.run_tool_txn(upgrader, index.ensure_schema_txn)
    version = observer.query(f"SELECT version FROM {index.SCHEMA}")[0][0]
    observer.commit()
    assert version == index.TOTALS_VERSION - 1
