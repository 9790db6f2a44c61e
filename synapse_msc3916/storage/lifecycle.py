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
from collections.abc import Awaitable, Callable
from typing import Any

import attr

from synapse_msc3916.config import StorageConfig
from synapse_msc3916.metrics import STORAGE_BYTES_DELETED, STORAGE_ERRORS, STORAGE_OBJECTS_DELETED
from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import StorageUnavailable
from synapse_msc3916.storage.lease import JobLease

logger = logging.getLogger(__name__)

TOMBSTONE_BATCH = 100
DELETE_BATCH = 50
# Batches per tick: bounds one tick's work; the next tick continues.
MAX_BATCHES = 20


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


def delete_if_in_time(
    store: Any, sha256: str, marking_started: float, clock: Callable[[], float] = time.monotonic
) -> bool:
    """Delete an object whose mark was taken at ``marking_started`` (``clock``), unless
    it is too late to be sure the delete ends before the mark may be taken over; in the
    thread that makes the S3 call, so that no queue sits between this check and it."""
    if clock() - marking_started > START_DELETE_WITHIN_SECONDS:
        return False
    store.delete(sha256)
    return True


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
    ):
        """``in_thread`` must run its function on a thread kept for this job (not a pool
        that uploads queue on), so that a delete starts right after its mark."""
        self._db = db
        self._in_thread = in_thread
        self._store = store
        self._delete_after_ms = delete_after_ms
        self._lease = lease
        self._clock = clock
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
        await self._work(done)
        paths, deleted = done
        if paths or deleted:
            logger.info(
                "synapse_msc3916: deletion job forgot %d path(s), deleted %d object(s)", paths, deleted
            )
        return paths, deleted

    async def _work(self, done: list[int]) -> None:
        """Counts into ``done`` as it goes, so that a lost lease still reports the work."""
        for _ in range(MAX_BATCHES):
            if not await self._may_go_on():
                return
            batch = await self._db(
                "apply_tombstones", index.apply_tombstones_txn, index.now_ms(), TOMBSTONE_BATCH
            )
            done[0] += batch.paths_removed
            if batch.tombstones < TOMBSTONE_BATCH:
                break
        for _ in range(MAX_BATCHES):
            due = await self._db(
                "due_blobs", index.due_blobs_txn, index.now_ms() - self._delete_after_ms, DELETE_BATCH
            )
            for sha256, length, gen in due:
                if not await self._may_go_on():
                    return
                done[1] += await self._delete_one(sha256, length, gen)
            if len(due) < DELETE_BATCH:
                break

    async def _delete_one(self, sha256: str, length: int, gen: int) -> int:
        started = self._clock()
        mark = await self._db("mark_deleting", index.mark_deleting_txn, sha256, gen)
        if mark is None:
            return 0  # referenced again (or taken) since the scan
        try:
            deleted = await self._in_thread(
                delete_if_in_time, self._store, sha256, started, self._clock
            )
        except StorageUnavailable as e:
            STORAGE_ERRORS.labels(operation="delete").inc()
            logger.error("synapse_msc3916: media storage delete of %s failed: %s", sha256, e)
            # The object may or may not be gone: never leave the row claiming it.
            if not await self._db("abort_deleting", index.abort_deleting_txn, sha256, mark):
                await self._check_after_lost_mark(sha256)
            return 0
        if not deleted:
            logger.warning(
                "synapse_msc3916: the delete of %s could not start within %ds of its mark;"
                " trying again later",
                sha256,
                START_DELETE_WITHIN_SECONDS,
            )
            await self._db("unmark_deleting", index.unmark_deleting_txn, sha256, mark)
            return 0
        if not await self._db("finish_deleting", index.finish_deleting_txn, sha256, mark):
            await self._check_after_lost_mark(sha256)
        STORAGE_OBJECTS_DELETED.inc()
        STORAGE_BYTES_DELETED.inc(length)
        return 1

    async def _check_after_lost_mark(self, sha256: str) -> None:
        if await self._in_thread(object_missing_after_lost_mark, self._store, sha256):
            await self._db("lost_object", index.lost_object_txn, sha256, index.now_ms())
