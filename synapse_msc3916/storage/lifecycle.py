"""The deletion job: follows Synapse's media deletions into the blob store.

Synapse's own ``DELETE`` on a media table leaves a tombstone (triggers of the
``media_deletions`` seam). This job, running in the one media process that holds its
lease (``lease.py``), turns tombstones into removed index paths and deletes an object
``delete_after`` after the last path (and the last upload's claim) on it went.

Everything it knows is in the database (tombstones, ``unref_ts``, the deleting mark),
so a restart loses nothing: the next tick carries on where the last one stopped. It
works in small batches so that a mass deletion (a ``media_retention`` pass, a user's
media purged) never holds a long transaction or a long burst of S3 calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import attr

from synapse_msc3916.config import StorageConfig
from synapse_msc3916.metrics import STORAGE_BYTES_DELETED, STORAGE_ERRORS, STORAGE_OBJECTS_DELETED
from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import StorageUnavailable
from synapse_msc3916.storage.lease import JobLease

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Tombstones per transaction, and at most this many transactions per tick: a mass
# deletion (10^5 media) is followed within a tick, in short transactions.
TOMBSTONE_BATCH = 100
MAX_TOMBSTONE_BATCHES = 1000
# Objects per batch: one marking transaction, one DeleteObjects call, one settling
# transaction. Big enough that a call carries many keys, small enough that each
# transaction stays short (two statements a row).
DELETE_BATCH = 100
# S3's limit of keys per DeleteObjects call: a batch is never more than one call.
MAX_KEYS_PER_DELETE = 1000
# Objects per tick: bounds one tick's work (and the time until the next tick applies
# new tombstones); the next tick continues.
MAX_DELETES_PER_TICK = 20_000


# S3 timeouts (connect, read) for deletions, by ``gc`` and by the deletion job. A blob
# stays marked "deleting" while its object is deleted; an upload of the same content
# takes a mark over once it is older than ``index.DELETING_STALE_MS`` (a deletion that
# died). The takeover is only safe if the deletion cannot still land afterwards, so it
# must take less than that: at most 2 attempts x (5 + 10) s = 30 s < 45 s.
GC_DELETE_TIMEOUTS = (5, 10)
DELETE_MAX_SECONDS = 2 * sum(GC_DELETE_TIMEOUTS)
# A delete is started only this soon after its mark was taken (measured from before the
# marking transaction, so on the safe side), so that it ends before the mark can be
# taken over; later, the mark is released and the next pass tries again.
START_DELETE_WITHIN_SECONDS = index.DELETING_STALE_MS / 1000 - DELETE_MAX_SECONDS
assert START_DELETE_WITHIN_SECONDS > 0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Marked:
    """A blob row a deletion marked (``index.Mark``), with its length for the counters."""

    sha256: str
    length: int
    mark: index.Mark


def mark_batch_txn(
    txn: index.Txn, rows: Sequence[tuple[str, int, int | None]], now: int
) -> list[Marked]:
    """Mark a batch of blobs for deletion in one transaction, each with the same
    conditional ``index.mark_*`` as one at a time: (sha256, length, gen) rows as the scan
    found them, or gen None for an object with no row at all (``gc``'s orphan sweep).
    Rows referenced again (or recorded) since the scan are left out."""
    marked = []
    for sha256, length, gen in rows:
        if gen is None:
            mark = index.mark_orphan_object_deleting_txn(txn, sha256, length, now)
        else:
            mark = index.mark_deleting_txn(txn, sha256, gen)
        if mark is not None:
            marked.append(Marked(sha256, length, mark))
    return marked


def unmark_batch_txn(txn: index.Txn, marked: Sequence[Marked]) -> None:
    """The batch was not deleted at all (too late to start): release every mark, the
    blobs stay due and the next pass tries again."""
    for m in marked:
        index.unmark_deleting_txn(txn, m.sha256, m.mark)


def settle_batch_txn(txn: index.Txn, marked: Sequence[Marked], failed: Collection[str]) -> list[str]:
    """After the batch's delete: finish the marks of the deleted objects, abort those of
    the ones that failed (they may or may not be gone: never leave a row claiming them).
    Both compare-and-set on the mark; returns the hashes whose mark an upload took over
    meanwhile, which the caller must check (:func:`object_missing_after_lost_mark`)."""
    lost = []
    for m in marked:
        if m.sha256 in failed:
            held = index.abort_deleting_txn(txn, m.sha256, m.mark)
        else:
            held = index.finish_deleting_txn(txn, m.sha256, m.mark)
        if not held:
            lost.append(m.sha256)
    return lost


def delete_if_in_time(
    store: Any,
    marked: Sequence[Marked],
    marking_started: float,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, str] | None:
    """Delete a marked batch (one ``DeleteObjects`` call on S3, so that the delete is one
    request bounded by ``GC_DELETE_TIMEOUTS``) whose marks were taken at
    ``marking_started`` (``clock``), unless it is too late to be sure the delete ends
    before a mark may be taken over: None then. In the thread that makes the S3 call,
    so that no queue sits between this check and it. Returns the hashes that failed,
    with why; raises ``StorageUnavailable`` if the store did not answer."""
    assert len(marked) <= MAX_KEYS_PER_DELETE
    if clock() - marking_started > START_DELETE_WITHIN_SECONDS:
        return None
    result: dict[str, str] = store.delete_many([m.sha256 for m in marked])
    return result


def object_missing_after_lost_mark(store: Any, sha256: str) -> bool:
    """A deletion lost its mark to an upload (it stalled past ``DELETING_STALE_MS``) and
    may have deleted the object after the upload wrote it again: whether it is gone.

    If so, the caller runs ``index.lost_object_txn``. A store that cannot answer is
    logged and trusted: reads then find a missing object by themselves
    (``mark_blob_missing_txn``), and ``scrub`` reports it.
    """
    try:
        missing = store.stat(sha256) is None
    except StorageUnavailable as e:
        logger.error(
            "synapse_msc3916: a deletion of %s lost its mark to an upload and the store"
            " cannot say whether the object is still there (%s); run `synapse-msc3916 scrub`",
            sha256,
            e,
        )
        return False
    if missing:
        logger.error(
            "synapse_msc3916: a stalled deletion of %s removed the object after an upload"
            " wrote it again; it is marked missing, so the next store of it rewrites it,"
            " and uploads of it in flight fail (`synapse-msc3916 scrub --repair` restores"
            " it from a local copy)",
            sha256,
        )
    else:
        logger.warning(
            "synapse_msc3916: a stalled deletion of %s lost its mark to an upload; the"
            " upload's object is in place",
            sha256,
        )
    return missing
# The same in ms: the job's lease must outlive any deletion it starts.
DELETE_MAX_MS = DELETE_MAX_SECONDS * 1000


def gc_storage_config(storage: StorageConfig) -> StorageConfig:
    connect, read = GC_DELETE_TIMEOUTS
    return attr.evolve(
        storage,
        connect_timeout=min(storage.connect_timeout, connect),
        read_timeout=min(storage.read_timeout, read),
    )


def tick_interval_ms(delete_after_ms: int) -> int:
    """How often the job looks for work: often enough that an object goes within a
    few seconds of ``delete_after`` (never more than a minute late), rarely enough to
    cost nothing when idle."""
    return int(min(60_000, max(5_000, delete_after_ms // 4)))


async def one_at_a_time(func: Callable[[T], Awaitable[Any]], items: Sequence[T]) -> list[Any]:
    """``DeletionJob``'s default ``gather``: the items one after the other (any event
    loop; tests that interleave by hand). Synapse's provider passes a concurrent one."""
    return [await func(item) for item in items]


class DeletionJob:
    """One tick = apply pending tombstones, then delete the objects that are due."""

    def __init__(
        self,
        db: Callable[..., Awaitable[Any]],
        in_thread: Callable[..., Awaitable[Any]],
        store: Any,
        delete_after_ms: int,
        lease: JobLease | None = None,
        clock: Callable[[], float] = time.monotonic,
        jobs: int = 1,
        gather: Callable[[Callable[[Any], Awaitable[Any]], Sequence[Any]], Awaitable[list[Any]]]
        = one_at_a_time,
    ):
        """``in_thread`` must run its function on threads kept for this job (not a pool
        that uploads queue on), at least ``jobs`` of them, so that a delete starts right
        after its mark. ``gather(func, items)`` runs ``func`` on every item at once: up to
        ``jobs`` batches are in flight together (``delete_jobs``)."""
        self._db = db
        self._in_thread = in_thread
        self._store = store
        self._delete_after_ms = delete_after_ms
        self._lease = lease
        self._clock = clock
        self._jobs = jobs
        self._gather = gather
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    async def _may_go_on(self) -> bool:
        """Before each step: this process still holds the lease, for longer than the
        step can take (without a lease, e.g. in tests, always)."""
        return self._lease is None or await self._lease.keep()

    async def tick(self) -> None:
        if self._running:  # a slow tick is never overlapped by the next one
            return
        self._running = True
        try:
            if await self._may_go_on():
                await self.run_once()
        except Exception:
            logger.exception("synapse_msc3916: the storage deletion job failed; retrying later")
        finally:
            self._running = False

    async def run_once(self) -> tuple[int, int]:
        """Returns (paths removed, objects deleted), for tests and the log."""
        await self._db("compact_totals", index.compact_totals_txn)
        done = [0, 0]
        started = self._clock()
        forgotten: float | None = None
        try:
            go_on = await self._forget_paths(done)
            forgotten = self._clock()
            if go_on:
                await self._delete_due(done)
        finally:
            ended = self._clock()
            forgotten = ended if forgotten is None else forgotten
            if done[0] or done[1]:
                # The durations say what a tick costs (and give the benchmark its rate).
                logger.info(
                    "synapse_msc3916: deletion job forgot %d path(s) in %.2fs, deleted %d"
                    " object(s) in %.2fs",
                    done[0],
                    forgotten - started,
                    done[1],
                    ended - forgotten,
                )
        return done[0], done[1]

    async def _forget_paths(self, done: list[int]) -> bool:
        """Apply pending tombstones; False if the lease went. Counts into ``done`` as it
        goes, so that a lost lease still reports the work."""
        for _ in range(MAX_TOMBSTONE_BATCHES):
            if not await self._may_go_on():
                return False
            batch = await self._db(
                "apply_tombstones", index.apply_tombstones_txn, index.now_ms(), TOMBSTONE_BATCH
            )
            done[0] += batch.paths_removed
            if batch.tombstones < TOMBSTONE_BATCH:
                break
        return True

    async def _delete_due(self, done: list[int]) -> None:
        """Delete due objects in rounds: one scan for up to ``jobs`` batches, then the
        batches at once, each marked, deleted and settled on its own. A round with a
        failure ends the tick (the store is likely down; the next tick tries again)."""
        looked = 0
        while looked < MAX_DELETES_PER_TICK:
            if not await self._may_go_on():
                return
            limit = self._jobs * DELETE_BATCH
            due = await self._db(
                "due_blobs", index.due_blobs_txn, index.now_ms() - self._delete_after_ms, limit
            )
            looked += len(due)
            # Spread a short list over every job rather than fill the first batches.
            size = max(1, -(-len(due) // self._jobs))
            batches = [due[i : i + size] for i in range(0, len(due), size)]

            async def delete(batch: list[tuple[str, int, int]]) -> bool:
                # Never raises: ``gather`` would return at once, with batches still
                # running into the next tick.
                try:
                    return await self._delete_batch(batch, done)
                except Exception:
                    logger.exception("synapse_msc3916: a batch of the deletion job failed")
                    return False

            went_well = await self._gather(delete, batches)
            if len(due) < limit or not all(went_well):
                return

    async def _delete_batch(self, rows: list[tuple[str, int, int]], done: list[int]) -> bool:
        """Mark, delete, settle one batch; False if it did not all go well."""
        started = self._clock()
        marked = await self._db("mark_deleting", mark_batch_txn, rows, index.now_ms())
        if not marked:
            return True  # referenced again (or taken) since the scan
        if not await self._may_go_on():  # the lease went while marking: leave it all
            await self._db("unmark_deleting", unmark_batch_txn, marked)
            return False
        try:
            failed = await self._in_thread(
                delete_if_in_time, self._store, marked, started, self._clock
            )
        except StorageUnavailable as e:
            STORAGE_ERRORS.labels(operation="delete").inc()
            logger.error(
                "synapse_msc3916: media storage delete of %d object(s) failed: %s", len(marked), e
            )
            # The objects may or may not be gone: never leave a row claiming them.
            await self._settle(marked, {m.sha256 for m in marked})
            return False
        if failed is None:
            logger.warning(
                "synapse_msc3916: the delete of %d object(s) could not start within %ds of"
                " their marks; trying again later",
                len(marked),
                START_DELETE_WITHIN_SECONDS,
            )
            await self._db("unmark_deleting", unmark_batch_txn, marked)
            return False
        await self._settle(marked, failed)
        for m in marked:
            if m.sha256 not in failed:
                done[1] += 1
                STORAGE_OBJECTS_DELETED.inc()
                STORAGE_BYTES_DELETED.inc(m.length)
        if failed:
            STORAGE_ERRORS.labels(operation="delete").inc(len(failed))
            sha256, why = next(iter(failed.items()))
            logger.error(
                "synapse_msc3916: media storage could not delete %d object(s), e.g. %s: %s",
                len(failed),
                sha256,
                why,
            )
        return not failed

    async def _settle(self, marked: list[Marked], failed: Collection[str]) -> None:
        for sha256 in await self._db("settle_deleting", settle_batch_txn, marked, failed):
            await self._check_after_lost_mark(sha256)

    async def _check_after_lost_mark(self, sha256: str) -> None:
        if await self._in_thread(object_missing_after_lost_mark, self._store, sha256):
            await self._db("lost_object", index.lost_object_txn, sha256, index.now_ms())
