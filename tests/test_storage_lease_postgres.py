"""The deletion job's lease on PostgreSQL: two processes never both hold it.

Two psycopg2 sessions stand for two media processes taking the lease
(``lease.take_lease_txn``) with the clock given by the test. The races are forced: one
session holds its uncommitted take while the other's take is shown (``pg_stat_activity``)
to be waiting on it, then the first commits.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from synapse_msc3916.homeserver_config import Database
from synapse_msc3916.storage import index, lease
from tests.harness_workers import PostgreSQL, postgres_for_module
from tests.test_storage_claims_postgres import _Background, _wait_until, _waiting_on_lock

DURATION = 45_000
NAME = lease.DELETION_JOB
_databases = iter(range(1000))


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgreSQL]:
    """The workers topology's server when there is one, else one of this module's own."""
    with postgres_for_module() as server:
        yield server


@pytest.fixture
def conns(postgres: PostgreSQL) -> Iterator[tuple[Database, Database, Database]]:
    """Process A, process B, an observer: three sessions at READ COMMITTED."""
    name = f"lease_{next(_databases)}_{int(time.time())}"
    postgres.create_database(name)
    dbs = tuple(Database(postgres.connect(name), "postgres") for _ in range(3))
    index.run_tool_txn(dbs[0], index.ensure_schema_txn)
    yield dbs  # type: ignore[misc]
    for db in dbs:
        db.conn.rollback()
        db.close()


def _take(db: Database, owner: str, now: int | None) -> lease.Taken:
    return index.run_tool_txn(db, lease.take_lease_txn, NAME, owner, owner.upper(), DURATION, now)


def test_two_takers_never_both_hold_the_lease(conns: tuple[Database, Database, Database]) -> None:
    """Two processes tick against one database on a clock the test moves: each tick a
    process takes or renews the lease, or stalls (skips renewing). At every instant at
    most one of them holds a lease that has not expired; takeovers really happen."""
    a, b, _ = conns
    rng = random.Random(3916)
    now = 1_000_000
    valid_until = {"a": -1, "b": -1}  # what each process was granted, by the database's clock
    takeovers = refusals = 0
    for _ in range(300):
        now += rng.choice((1_000, 5_000, 20_000, DURATION))
        for owner, db in (("a", a), ("b", b)):
            if rng.random() < 0.3:
                continue  # this process stalls this tick
            taken = _take(db, owner, now)
            if taken.held:
                other = "b" if owner == "a" else "a"
                assert valid_until[other] <= now, (owner, now, valid_until)  # never both
                if taken.previous is not None and taken.previous.owner != owner:
                    takeovers += 1
                valid_until[owner] = now + DURATION
            else:
                refusals += 1
                assert taken.previous is not None and taken.previous.expires_ts > now
                valid_until[owner] = min(valid_until[owner], now)  # it learnt it lost
    assert takeovers >= 10 and refusals >= 10, (takeovers, refusals)  # both sides exercised


def test_an_old_holder_learns_it_lost_the_lease(conns: tuple[Database, Database, Database]) -> None:
    a, b, _ = conns
    assert _take(a, "a", 0).held
    assert not _take(b, "b", DURATION - 1).held  # not expired yet
    assert _take(a, "a", 10_000).held  # renewed: expires at 10 000 + DURATION
    assert not _take(b, "b", DURATION + 5_000).held
    taken = _take(b, "b", 10_000 + DURATION)  # expired exactly now: taken over
    assert taken.held and taken.previous is not None and taken.previous.owner == "a"
    late = _take(a, "a", 10_000 + DURATION + 1)  # A comes back from a stall
    assert not late.held and late.previous is not None and late.previous.owner == "b"


def test_two_processes_taking_an_expired_lease_at_once(conns: tuple[Database, Database, Database]) -> None:
    """Both read the same expired row; A's take is not committed when B's runs. B must
    wait for A and then see A's row, not replace it (which a plain "UPDATE ... WHERE
    expired", judged on B's first snapshot, would have done)."""
    a, b, observer = conns
    assert _take(a, "old", 0).held  # a process that died: expires at DURATION
    now = DURATION + 1
    taken_a = lease.take_lease_txn(index.ToolTxn(a), NAME, "a", "A", DURATION, now)  # not committed
    assert taken_a.held and taken_a.previous is not None and taken_a.previous.owner == "old"
    taking_b = _Background(lambda: lease.take_lease_txn(index.ToolTxn(b), NAME, "b", "B", DURATION, now))
    _wait_until(lambda: _waiting_on_lock(observer, b), "B waits for A's take")
    a.commit()
    taken_b = taking_b.join()
    b.commit()
    assert not taken_b.held and taken_b.previous is not None and taken_b.previous.owner == "a"
    assert observer.query(f"SELECT owner FROM {index.LEASES}") == [("a",)]


def test_two_processes_taking_the_first_lease_at_once(conns: tuple[Database, Database, Database]) -> None:
    """No row yet: A's insert is not committed when B's runs; B waits, then finds A's row."""
    a, b, observer = conns
    assert lease.take_lease_txn(index.ToolTxn(a), NAME, "a", "A", DURATION, 5).held  # not committed
    taking_b = _Background(lambda: lease.take_lease_txn(index.ToolTxn(b), NAME, "b", "B", DURATION, 5))
    _wait_until(lambda: _waiting_on_lock(observer, b), "B waits for A's insert")
    a.commit()
    taken_b = taking_b.join()
    b.commit()
    assert not taken_b.held and taken_b.previous is not None and taken_b.previous.owner == "a"


def test_the_database_clock_and_release(conns: tuple[Database, Database, Database]) -> None:
    """Without a test clock, times are PostgreSQL's; a released lease is taken at once."""
    a, b, observer = conns
    taken = _take(a, "a", None)
    assert taken.held
    [(renewed, expires)] = observer.query(f"SELECT renewed_ts, expires_ts FROM {index.LEASES}")
    assert renewed == taken.now and expires - renewed == DURATION
    assert not _take(b, "b", None).held
    assert index.run_tool_txn(a, lease.release_lease_txn, NAME, "a")
    assert not index.run_tool_txn(a, lease.release_lease_txn, NAME, "a")  # once
    taken_b = _take(b, "b", None)
    assert taken_b.held and taken_b.previous is not None and taken_b.previous.owner == "a"
