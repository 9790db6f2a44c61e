"""The deletion job's lease as one process sees it, and the start-up steps, on SQLite.

Real SQLite transactions, no Synapse: a process's monotonic clock is given by the test,
and a lease left by a dead process is made by writing its row as it would be.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from synapse_msc3916.storage import index, lease, provider
from tests.test_storage_unit import SqliteTxn

TICK = 5_000
STEP = 30_000

MEDIA_TABLES = """
    CREATE TABLE local_media_repository (media_id TEXT, media_length INT, sha256 TEXT);
    CREATE TABLE remote_media_cache (media_origin TEXT, media_id TEXT, filesystem_id TEXT,
        media_length INT, sha256 TEXT);
    CREATE TABLE local_media_repository_thumbnails (media_id TEXT, thumbnail_width INT,
        thumbnail_height INT, thumbnail_type TEXT, thumbnail_method TEXT);
    CREATE TABLE remote_media_cache_thumbnails (media_origin TEXT, media_id TEXT,
        filesystem_id TEXT, thumbnail_width INT, thumbnail_height INT, thumbnail_type TEXT,
        thumbnail_method TEXT);
"""


class Db:
    """``db(desc, func, *args)`` as the provider has it: one committed transaction per call."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.calls = 0

    async def __call__(self, desc: str, func: Callable[..., Any], *args: Any) -> Any:
        self.calls += 1
        return await self.run(desc, lambda txn: func(txn, *args))

    async def run(self, desc: str, func: Callable[[Any], Any]) -> Any:
        self.conn.execute("BEGIN")
        try:
            result = func(SqliteTxn(self.conn))
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return result

    def sql(self, sql: str, args: tuple = ()) -> list[Any]:
        return self.conn.execute(sql, args).fetchall()


@pytest.fixture
def db() -> Db:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(MEDIA_TABLES)
    index.ensure_schema_txn(SqliteTxn(conn))
    return Db(conn)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _process(db: Db, name: str, clock: Clock) -> lease.JobLease:
    return lease.JobLease(db, lease.DELETION_JOB, f"boot-{name}", name, TICK, STEP, monotonic=clock)


def _age_lease(db: Db, expired_ms_ago: int) -> None:
    """The holder died: its lease expired that long ago (by the database's clock)."""
    db.sql(f"UPDATE {index.LEASES} SET expires_ts = ?", (index.now_ms() - expired_ms_ago,))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_process_that_cannot_run_the_job_warns_when_nobody_holds_the_lease(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="synapse_msc3916")
    clock = Clock()
    media1, media2 = _process(db, "media1", clock), _process(db, "media2", clock)
    assert asyncio.run(media1.keep())
    assert "synapse_msc3916: this process (media1) took the storage deletion job's lease" in caplog.text
    asyncio.run(media2.check())  # media2's job is disabled (say, its triggers failed)
    assert "the storage deletion job runs on media1 (it holds the lease)" in caplog.text
    assert _warnings(caplog) == []

    _age_lease(db, 2 * TICK)  # expired, but for fewer than three ticks: not yet worth a WARN
    asyncio.run(media2.check())
    assert _warnings(caplog) == []
    _age_lease(db, 4 * TICK)
    asyncio.run(media2.check())
    [warning] = _warnings(caplog)
    assert "no process has held the storage deletion job's lease for 20 s (last held by media1)" in warning
    asyncio.run(media2.check())
    assert len(_warnings(caplog)) == 1  # not repeated every tick
    clock.t += lease.WARN_EVERY_MS / 1000
    asyncio.run(media2.check())
    assert len(_warnings(caplog)) == 2


def test_taking_over_a_long_expired_lease_says_the_job_did_not_run(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="synapse_msc3916")
    clock = Clock()
    assert asyncio.run(_process(db, "media1", clock).keep())
    _age_lease(db, 60_000)
    # A process that just started (all media processes were down: a restart) says who
    # it took the lease from, and no more.
    assert asyncio.run(_process(db, "media2", clock).keep())
    assert "this process (media2) took the storage deletion job's lease over from media1" in caplog.text
    assert _warnings(caplog) == []
    # One that has been up all along and only now got it (its ticks failed): a WARN.
    media3 = _process(db, "media3", clock)
    clock.t += 60
    _age_lease(db, 60_000)
    assert asyncio.run(media3.keep())
    [warning] = _warnings(caplog)
    assert "the storage deletion job did not run for 60 s: the lease of media2 expired" in warning


def test_a_holder_renews_every_half_tick_and_learns_it_lost(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    media1 = _process(db, "media1", clock)
    assert asyncio.run(media1.keep()) and db.calls == 1
    clock.t += 1.0
    assert asyncio.run(media1.keep()) and db.calls == 1  # fresh: no database call per step
    clock.t += TICK / 2000
    assert asyncio.run(media1.keep()) and db.calls == 2  # renewed
    [(renewed, expires)] = db.sql(f"SELECT renewed_ts, expires_ts FROM {index.LEASES}")
    assert expires - renewed == lease.lease_duration_ms(TICK, STEP)

    # media1 stalls past its lease; media2 takes it over; media1 must not go on.
    clock.t += lease.lease_duration_ms(TICK, STEP) / 1000
    assert not media1.held
    _age_lease(db, 1)
    assert asyncio.run(_process(db, "media2", clock).keep())
    assert not asyncio.run(media1.keep())
    assert "this process (media1) lost the storage deletion job's lease to media2" in caplog.text


def test_a_lease_is_only_kept_while_it_outlives_a_step(db: Db) -> None:
    """When the database cannot be reached, the holder goes on only while its lease would
    outlast the longest step (a bounded S3 delete), never up to its end."""
    clock = Clock()
    media1 = _process(db, "media1", clock)
    assert asyncio.run(media1.keep())
    db.conn.execute(f"DROP TABLE {index.LEASES}")  # every renewal now fails
    duration = lease.lease_duration_ms(TICK, STEP) / 1000
    clock.t += duration - STEP / 1000 - 1
    assert asyncio.run(media1.keep())
    clock.t += 2
    assert media1.held and not asyncio.run(media1.keep())


# --- start-up steps ------------------------------------------------------------------


def test_a_failing_trigger_step_still_releases_the_claims(caplog: pytest.LogCaptureFixture) -> None:
    """Synapse's thumbnail table lacks a column the trigger reads: the trigger step fails
    for real (the probe's RuntimeError). Before the steps were split, the claim release
    ran in the same transaction and was rolled back with it: the claim of the previous
    life stayed (checked against the unchanged code: `claims left: [('tok',)]`)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(MEDIA_TABLES.replace(", thumbnail_method TEXT);", ");", 1))
    index.ensure_schema_txn(SqliteTxn(conn))
    db = Db(conn)
    # A previous life of media1 (boot "old", stopped beating) and a live media2.
    index.boot_heartbeat_txn(SqliteTxn(conn), "old", "media1")
    index.boot_heartbeat_txn(SqliteTxn(conn), "live", "media2")
    conn.execute(
        f"UPDATE {index.BOOTS} SET seen_ts = seen_ts - ? WHERE boot = 'old'", (index.BOOT_STALE_MS + 1,)
    )
    index.claim_blob_txn(SqliteTxn(conn), "aa" * 32, 1, 1000, index.Claim("tok", "p", "media1", "old"))
    index.claim_blob_txn(SqliteTxn(conn), "bb" * 32, 1, 1000, index.Claim("other", "q", "media2", "live"))

    async def no_sleep(_: float) -> None:
        raise AssertionError("a RuntimeError is not retried")

    results = asyncio.run(provider.run_startup_steps(provider.startup_steps("media1", "new"), db.run, no_sleep))
    triggers, claims = results[provider.TRIGGERS_STEP], results[provider.CLAIMS_STEP]
    assert not triggers.ok and triggers.permanent
    assert claims.ok
    assert claims.value == 1
    assert db.sql(f"SELECT token FROM {index.CLAIMS}") == [("other",)]  # the stopped boot's released
    assert [d[0] for d in index.due_blobs_txn(SqliteTxn(conn), index.now_ms() + 1)] == ["aa" * 32]
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "start-up step deletion_triggers failed" in error
    assert "local_media_repository_thumbnails" in error and "not followed" in error


def test_a_step_that_fails_once_is_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[int] = []
    slept: list[float] = []

    def flaky(txn: Any) -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    def broken(txn: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async def run(name: str, func: Callable[[Any], Any]) -> Any:
        return func(None)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    steps = [provider.StartupStep("broken", broken, "it matters"), provider.StartupStep("flaky", flaky, "")]
    results = asyncio.run(provider.run_startup_steps(steps, run, sleep))
    assert results["flaky"].ok and results["flaky"].value == "done" and len(attempts) == 3
    assert not results["broken"].ok and not results["broken"].permanent
    assert len(slept) == 4 + 2
    assert "start-up step broken failed 5 times (last: OperationalError: disk I/O error); it matters" in caplog.text


def test_a_take_in_flight_when_shutdown_begins_is_handed_back(db: Db) -> None:
    """Seen in a workers run before this was handled: the tick took the lease while the
    shutdown's release was already under way, and logged "took" after "released" (this
    test then failed: ``keep()`` answered True)."""
    clock = Clock()
    media1 = _process(db, "media1", clock)
    gate = asyncio.Event()

    async def slow_db(desc: str, func: Callable[..., Any], *args: Any) -> Any:
        if desc == "lease_take":
            await gate.wait()
        return await db(desc, func, *args)

    media1._db = slow_db  # noqa: SLF001

    async def scenario() -> tuple[bool, None]:
        taking = asyncio.ensure_future(media1.keep())
        await asyncio.sleep(0)  # the take is waiting on the database
        releasing = asyncio.ensure_future(media1.release())
        await asyncio.sleep(0)  # the shutdown's release has begun
        gate.set()
        return await asyncio.gather(taking, releasing)

    took, _ = asyncio.run(scenario())
    assert not took and not media1.held
    [(expires,)] = db.sql(f"SELECT expires_ts FROM {index.LEASES}")
    assert expires <= index.now_ms()  # handed back: another process takes it at once
    assert not asyncio.run(media1.keep())  # and never taken again by this process
