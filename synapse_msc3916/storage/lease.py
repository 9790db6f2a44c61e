"""A lease in the database: which one of the media processes runs the deletion job.

Every process that loads the storage provider can run the deletion job, and any one of
them may: the job keeps all its state in the database. Choosing the process from the
configuration (``media_instance_running_background_jobs``, else the main process) left
the job silently not running when the named process loads no provider, e.g. one media
worker, the option unset and ``enable_media_repo: false`` on the main process. A lease
needs no configuration: each media process tries to take it every tick, the holder
renews it, and another one takes it over once it has expired.

The lease is a row (``msc3916_storage_leases``) changed only by one compare-and-swap
``UPDATE`` (or an ``INSERT ... ON CONFLICT DO NOTHING`` for the first one), so two
processes can never both take it; at READ COMMITTED PostgreSQL re-checks the
condition on the row a concurrent taker just committed. Expiry is judged by the
database's clock (PostgreSQL's ``clock_timestamp()``), never by comparing two machines'
clocks. The holder also keeps a local deadline on its monotonic clock, started before
it asked the database, so it stops acting before the database thinks the lease
expired.

The owner is a per-boot id, not the instance name: two processes with the same name
(a rolling update with surge) are two owners.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attr

from synapse_msc3916.metrics import STORAGE_DELETION_LEASE_HELD
from synapse_msc3916.storage.index import LEASES, Txn, db_now_sql

logger = logging.getLogger(__name__)

DELETION_JOB = "deletion_job"

# Nobody held the lease for this many ticks: someone says so, loudly.
STALE_TICKS = 3
# A WARN about a lease nobody holds is repeated at most this often per process.
WARN_EVERY_MS = 10 * 60 * 1000


def lease_duration_ms(tick_ms: int, longest_step_ms: int) -> int:
    """A holder renews every half tick while it works, and checks before each step
    that the lease outlives the step (``longest_step_ms``, a bounded S3 delete), so it
    never starts what it could not finish before another process may take over.
    Three ticks more is the slack for a slow tick before a takeover."""
    return STALE_TICKS * tick_ms + longest_step_ms


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LeaseRow:
    owner: str
    instance: str
    taken_ts: int
    renewed_ts: int
    expires_ts: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Taken:
    held: bool  # whether the caller holds the lease now
    now: int  # the database's clock when it was decided
    previous: LeaseRow | None  # the row before (the holder when not ``held``)


def db_now_ms_txn(txn: Txn) -> int:
    """The database's clock in ms (:func:`index.db_now_sql`): the one clock every process
    sees the same."""
    txn.execute(f"SELECT {db_now_sql(txn)}", ())
    return int(txn.fetchone()[0])


def _read_txn(txn: Txn, name: str) -> LeaseRow | None:
    txn.execute(
        f"SELECT owner, instance, taken_ts, renewed_ts, expires_ts FROM {LEASES} WHERE name = ?",
        (name,),
    )
    row = txn.fetchone()
    if row is None:
        return None
    return LeaseRow(str(row[0]), str(row[1]), int(row[2]), int(row[3]), int(row[4]))


def read_lease_txn(txn: Txn, name: str) -> tuple[LeaseRow | None, int]:
    """The lease row (None if nobody ever took it) and the database's clock."""
    return _read_txn(txn, name), db_now_ms_txn(txn)


def take_lease_txn(
    txn: Txn, name: str, owner: str, instance: str, duration_ms: int, now: int | None = None
) -> Taken:
    """Take the lease, or renew it if ``owner`` holds it; expired leases are taken over.

    ``now`` is the database's clock unless a test controls it.
    """
    if now is None:
        now = db_now_ms_txn(txn)
    while True:
        previous = _read_txn(txn, name)
        if previous is None:
            txn.execute(
                f"INSERT INTO {LEASES} (name, owner, instance, taken_ts, renewed_ts, expires_ts)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (name, owner, instance, now, now, now + duration_ms),
            )
            if txn.rowcount == 1:
                return Taken(True, now, None)
            continue  # another process inserted it first: judge its row
        if previous.owner != owner and previous.expires_ts > now:
            return Taken(False, now, previous)
        taken_ts = previous.taken_ts if previous.owner == owner else now
        # The compare-and-swap: only the row as read is replaced. A taker that read the
        # same expired row and committed first makes this match nothing (PostgreSQL
        # waits for its commit, then re-checks the condition on its row).
        txn.execute(
            f"UPDATE {LEASES} SET owner = ?, instance = ?, taken_ts = ?, renewed_ts = ?,"
            " expires_ts = ? WHERE name = ? AND owner = ? AND expires_ts = ?",
            (owner, instance, taken_ts, now, now + duration_ms, name, previous.owner,
             previous.expires_ts),
        )
        if txn.rowcount == 1:
            return Taken(True, now, previous)
        # changed since read: judge the new row


def release_lease_txn(txn: Txn, name: str, owner: str) -> bool:
    """Let the lease expire now (a clean shutdown), so another process takes it at its
    next tick instead of waiting for the expiry. The row stays: it says who held it last."""
    now = db_now_ms_txn(txn)
    txn.execute(
        f"UPDATE {LEASES} SET expires_ts = ? WHERE name = ? AND owner = ? AND expires_ts > ?",
        (now, name, owner, now),
    )
    return txn.rowcount == 1


class JobLease:
    """One process's view of a lease: takes, renews, logs, and warns when nobody holds it.

    ``db(desc, func, *args)`` runs ``func(txn, *args)`` in a transaction.
    """

    def __init__(
        self,
        db: Callable[..., Awaitable[Any]],
        name: str,
        owner: str,
        instance: str,
        tick_ms: int,
        longest_step_ms: int,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._db = db
        self.name = name
        self.owner = owner
        self.instance = instance
        self.tick_ms = tick_ms
        self.duration_ms = lease_duration_ms(tick_ms, longest_step_ms)
        self._longest_step_ms = longest_step_ms
        self._monotonic = monotonic
        self._created = monotonic()
        self._renewed: float | None = None  # monotonic instant of the last renewal asked
        self._deadline: float | None = None  # monotonic instant the lease surely ends
        self._seen_holder: str | None = None
        self._last_warning: float | None = None
        self._released = False  # shutting down: never take the lease again
        STORAGE_DELETION_LEASE_HELD.set(0)

    @property
    def held(self) -> bool:
        return self._deadline is not None and self._monotonic() < self._deadline

    async def keep(self) -> bool:
        """True if this process holds the lease and may start a step now.

        Asks the database only when the last renewal is half a tick old, or when the
        lease would not outlive a step: called before every step of the job.
        """
        if self._released:
            return False
        now = self._monotonic()
        if (
            self._deadline is not None
            and self._renewed is not None
            and now - self._renewed < self.tick_ms / 2000
            and self._deadline - now > self._longest_step_ms / 1000
        ):
            return True
        asked = self._monotonic()
        try:
            taken: Taken = await self._db(
                "lease_take", take_lease_txn, self.name, self.owner, self.instance, self.duration_ms
            )
        except Exception:
            logger.exception("synapse_msc3916: could not renew the storage deletion job's lease")
            left = 0.0 if self._deadline is None else self._deadline - self._monotonic()
            return left * 1000 > self._longest_step_ms
        was_held = self.held
        if taken.held and self._released:  # shutdown began meanwhile: hand it back
            await self._db("lease_release", release_lease_txn, self.name, self.owner)
            return False
        if taken.held:
            self._renewed = asked
            self._deadline = asked + self.duration_ms / 1000
            if not was_held:
                self._log_taken(taken)
            STORAGE_DELETION_LEASE_HELD.set(1)
            return True
        if was_held or self._deadline is not None:
            logger.warning(
                "synapse_msc3916: this process (%s) lost the storage deletion job's lease to %s:"
                " it was not renewed in time",
                self.instance,
                taken.previous.instance if taken.previous else "?",
            )
        self._renewed = self._deadline = None
        STORAGE_DELETION_LEASE_HELD.set(0)
        self._observe(taken.previous, taken.now)
        return False

    async def release(self) -> None:
        """At shutdown: hand the lease on at once rather than after its expiry."""
        self._released = True
        if self._deadline is None:
            return
        self._renewed = self._deadline = None
        STORAGE_DELETION_LEASE_HELD.set(0)
        if await self._db("lease_release", release_lease_txn, self.name, self.owner):
            logger.info("synapse_msc3916: this process (%s) released the storage deletion job's lease", self.instance)

    async def check(self) -> None:
        """For a process that cannot run the job now (the job is disabled here, or its
        last tick has not returned): look at the lease, and warn if nobody holds it."""
        row, now = await self._db("lease_read", read_lease_txn, self.name)
        if self.held and row is not None and row.owner == self.owner and row.expires_ts > now:
            return
        if self._deadline is not None and not self.held:
            self._renewed = self._deadline = None
            STORAGE_DELETION_LEASE_HELD.set(0)
        self._observe(row, now)

    def _log_taken(self, taken: Taken) -> None:
        previous = taken.previous
        if previous is None or previous.owner == self.owner:
            logger.info("synapse_msc3916: this process (%s) took the storage deletion job's lease", self.instance)
        else:
            logger.info(
                "synapse_msc3916: this process (%s) took the storage deletion job's lease"
                " over from %s (expired %d s ago)",
                self.instance,
                previous.instance,
                (taken.now - previous.expires_ts) // 1000,
            )
        self._seen_holder = self.owner
        if previous is None:
            return
        # Only the part of the gap this process was up for is a fault (it could have
        # taken the lease and did not); the rest is a restart with no media process up.
        up_ms = int((self._monotonic() - self._created) * 1000)
        idle_ms = min(taken.now - previous.expires_ts, up_ms)
        if idle_ms > STALE_TICKS * self.tick_ms:
            logger.warning(
                "synapse_msc3916: the storage deletion job did not run for %d s: the lease of %s"
                " expired and no media process took it over until now",
                (taken.now - previous.expires_ts) // 1000,
                previous.instance,
            )

    def _observe(self, row: LeaseRow | None, now: int) -> None:
        """Log who runs the job when that changes; warn when nobody has for a while."""
        if row is not None and row.expires_ts > now:
            if row.owner != self._seen_holder:
                self._seen_holder = row.owner
                logger.info(
                    "synapse_msc3916: the storage deletion job runs on %s (it holds the lease)",
                    row.instance,
                )
            return
        self._seen_holder = None
        if row is not None:
            idle_ms = now - row.expires_ts
            since = f"(last held by {row.instance})"
        else:  # never taken: judged by how long this process has waited
            idle_ms = int((self._monotonic() - self._created) * 1000) - self.duration_ms
            since = "(never taken)"
        if idle_ms <= STALE_TICKS * self.tick_ms:
            return
        mono = self._monotonic()
        if self._last_warning is not None and (mono - self._last_warning) * 1000 < WARN_EVERY_MS:
            return
        self._last_warning = mono
        logger.warning(
            "synapse_msc3916: no process has held the storage deletion job's lease for %d s %s:"
            " media deleted in Synapse stay in the store; the job runs on a media process"
            " that loads the storage provider (see its log for why none does)",
            idle_ms // 1000,
            since,
        )
