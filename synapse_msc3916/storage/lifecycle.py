"""The deletion job: follows Synapse's media deletions into the blob store.

Synapse's own ``DELETE`` on a media table leaves a tombstone (triggers of the
``media_deletions`` seam). This job, running in the one process Synapse runs media
background jobs on, turns tombstones into removed index paths and deletes an object
``delete_after`` after the last path (and the last upload's claim) on it went.

Everything it knows is in the database (tombstones, ``unref_ts``, the deleting mark),
so a restart loses nothing: the next tick carries on where the last one stopped. It
works in small batches so that a mass deletion (a ``media_retention`` pass, a user's
media purged) never holds a long transaction or a long burst of S3 calls.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attr

from synapse_msc3916.config import StorageConfig
from synapse_msc3916.metrics import STORAGE_BYTES_DELETED, STORAGE_ERRORS, STORAGE_OBJECTS_DELETED
from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import StorageUnavailable

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
    ):
        self._db = db
        self._in_thread = in_thread
        self._store = store
        self._delete_after_ms = delete_after_ms
        self._running = False

    async def tick(self) -> None:
        if self._running:  # a slow tick is never overlapped by the next one
            return
        self._running = True
        try:
            await self.run_once()
        except Exception:
            logger.exception("synapse_msc3916: the storage deletion job failed; retrying later")
        finally:
            self._running = False

    async def run_once(self) -> tuple[int, int]:
        """Returns (paths removed, objects deleted), for tests and the log."""
        await self._db("compact_totals", index.compact_totals_txn)
        paths = 0
        for _ in range(MAX_BATCHES):
            batch = await self._db(
                "apply_tombstones", index.apply_tombstones_txn, index.now_ms(), TOMBSTONE_BATCH
            )
            paths += batch.paths_removed
            if batch.tombstones < TOMBSTONE_BATCH:
                break
        deleted = 0
        for _ in range(MAX_BATCHES):
            due = await self._db(
                "due_blobs", index.due_blobs_txn, index.now_ms() - self._delete_after_ms, DELETE_BATCH
            )
            for sha256, length, gen in due:
                deleted += await self._delete_one(sha256, length, gen)
            if len(due) < DELETE_BATCH:
                break
        if paths or deleted:
            logger.info(
                "synapse_msc3916: deletion job forgot %d path(s), deleted %d object(s)", paths, deleted
            )
        return paths, deleted

    async def _delete_one(self, sha256: str, length: int, gen: int) -> int:
        mark = index.now_ms()
        if not await self._db("mark_deleting", index.mark_deleting_txn, sha256, gen, mark):
            return 0  # referenced again (or taken) since the scan
        try:
            await self._in_thread(self._store.delete, sha256)
        except StorageUnavailable as e:
            STORAGE_ERRORS.labels(operation="delete").inc()
            logger.error("synapse_msc3916: media storage delete of %s failed: %s", sha256, e)
            # The object may or may not be gone: never leave the row claiming it.
            await self._db("abort_deleting", index.abort_deleting_txn, sha256, mark)
            return 0
        await self._db("finish_deleting", index.finish_deleting_txn, sha256, mark)
        STORAGE_OBJECTS_DELETED.inc()
        STORAGE_BYTES_DELETED.inc(length)
        return 1
