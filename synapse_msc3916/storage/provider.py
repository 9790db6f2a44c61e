"""``DedupStorageProvider``: a Synapse media storage provider storing each content once.

Synapse hands a provider every file it keeps (local and remote originals, thumbnails)
under a path of its own choosing; many of those paths carry the same bytes (forwarded
images, the same meme uploaded by many users, remote media cached twice). The provider
keys objects by SHA-256 instead and remembers path -> SHA-256 in Synapse's database
(see ``index.py``), so a second copy costs an index row, not an object.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attr
from twisted.python.threadpool import ThreadPool

from synapse_msc3916 import synapse_adapter as sa
from synapse_msc3916.config import StorageConfig
from synapse_msc3916.metrics import (
    STORAGE_BYTES_SAVED,
    STORAGE_BYTES_WRITTEN,
    STORAGE_CORRUPTIONS,
    STORAGE_DAMAGED,
    STORAGE_DEDUP_HITS,
    STORAGE_ERRORS,
    STORAGE_FETCH_LATENCY,
    STORAGE_FETCHES,
    STORAGE_HEALS,
    STORAGE_STORES,
)
from synapse_msc3916.storage import cors, index
from synapse_msc3916.storage.blobstore import S3BlobStore, StorageUnavailable, make_blobstore
from synapse_msc3916.storage.lease import DELETION_JOB, JobLease
from synapse_msc3916.storage.lifecycle import (
    DELETE_MAX_MS,
    DeletionJob,
    gc_storage_config,
    tick_interval_ms,
)
from synapse_msc3916.storage.redirect import Redirector
from synapse_msc3916.storage.responder import CHUNK_SIZE, BlobResponder

logger = logging.getLogger(__name__)

# Temp-file paths announced by the spam-check hook, waiting for their store_file call.
_PENDING_MAX = 10_000
# How long an upload waits for a GC to finish deleting the same content, in total. It
# must exceed ``index.DELETING_STALE_MS``: a mark left by a gc that died is then taken
# over by the waiting upload (claim answers ``write``) before the upload gives up.
_WAIT_FOR_GC_SECONDS = 60.0
assert _WAIT_FOR_GC_SECONDS * 1000 > index.DELETING_STALE_MS


def hash_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    length = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            length += len(chunk)
    return digest.hexdigest(), length


def _open_and_read_small(store: Any, sha256: str, length: int) -> tuple[Any, Any]:
    """Open a blob; one chunk or smaller, read and hash it in the same pool call.

    Most media are small: this saves the responder a second trip through the thread
    pool for them. Returns (reader or None, (bytes, sha256 digest) or None).
    """
    reader = store.open(sha256)
    if reader is None or reader.size != length or not 0 < length <= CHUNK_SIZE:
        return reader, None
    try:
        data = reader.read(length)
    except BaseException:
        reader.close()
        raise
    return reader, (data, hashlib.sha256(data))


TRIGGERS_STEP = "deletion_triggers"
CLAIMS_STEP = "release_claims"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StartupStep:
    """One piece of start-up work: one transaction, failing on its own."""

    name: str  # for the log and the transaction's description
    func: Callable[[Any], Any]  # func(txn)
    if_failed: str  # what a failure means, for the admin reading the log


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StepResult:
    ok: bool
    value: Any = None  # what the step returned
    permanent: bool = False  # failed with a RuntimeError saying why: retrying cannot help


def startup_steps(instance: str, boot: str) -> list[StartupStep]:
    """What a starting process does once the index schema exists, independent steps."""

    def triggers_txn(txn: Any) -> list[str]:
        index.schema_lock_txn(txn)
        created = sa.ensure_deletion_triggers_txn(txn)
        index.note_tombstones_since_txn(txn, index.now_ms())
        return created

    def first_heartbeat_txn(txn: Any) -> int:
        # Records this boot (its claims are held while it beats) and releases the
        # claims of boots that stopped beating: a previous life of this process's.
        return index.boot_heartbeat_txn(txn, boot, instance)

    return [
        StartupStep(
            TRIGGERS_STEP,
            triggers_txn,
            "media deletions are not followed into the store; run `synapse-msc3916 gc` to free space",
        ),
        StartupStep(
            CLAIMS_STEP,
            first_heartbeat_txn,
            "this process's heartbeat retries every 30 s; until it succeeds, claims of"
            " uploads of stopped processes keep their content",
        ),
    ]


async def run_startup_steps(
    steps: list[StartupStep],
    run: Callable[[str, Callable[[Any], Any]], Awaitable[Any]],
    sleep: Callable[[float], Awaitable[Any]],
    attempts: int = 5,
) -> dict[str, StepResult]:
    """Run each step in its own transaction (``run(name, func)``), whatever the others did.

    A step is retried a few times (two processes starting at once can collide on
    PostgreSQL's catalogue); a ``RuntimeError`` is a problem the step has explained, not
    retried. Each failure is one ERROR naming the step and what it means.
    """
    results: dict[str, StepResult] = {}
    for step in steps:
        for attempt in range(attempts):
            try:
                results[step.name] = StepResult(True, await run(step.name, step.func))
                break
            except RuntimeError as e:
                logger.error("synapse_msc3916: start-up step %s failed: %s; %s", step.name, e, step.if_failed)
                results[step.name] = StepResult(False, permanent=True)
                break
            except Exception as e:
                if attempt == attempts - 1:
                    logger.error(
                        "synapse_msc3916: start-up step %s failed %d times (last: %s: %s); %s",
                        step.name, attempts, type(e).__name__, e, step.if_failed, exc_info=True,
                    )
                    results[step.name] = StepResult(False)
                    break
                await sleep(0.2 * (attempt + 1))
    return results


def media_ref(file_info: Any) -> index.MediaRef:
    thumb = file_info.thumbnail
    if thumb is None:
        return index.MediaRef(file_info.server_name, file_info.file_id)
    return index.MediaRef(
        file_info.server_name,
        file_info.file_id,
        thumb.width,
        thumb.height,
        thumb.type,
        thumb.method,
    )


def file_kind(file_info: Any) -> str:
    where = "remote" if file_info.server_name else "local"
    return f"{where}_thumbnail" if file_info.thumbnail else where


class DedupStorageProvider:
    """Synapse constructs this as ``DedupStorageProvider(hs, parse_config(config))``."""

    def __init__(self, hs: Any, config: StorageConfig):
        self._hs = hs
        if config.redirect.enabled and config.region_name is None:
            config = self._discover_region(config)
        self._config = config
        self._api = sa.storage_module_api(hs)
        self._reactor = sa.storage_reactor(hs)
        self._media_store = sa.media_store_path(hs)
        self._store = make_blobstore(config)
        size = config.threadpool_size if config.backend == "s3" else 10
        self._pool = ThreadPool(1, size, name="msc3916-storage")
        self._reactor.callWhenRunning(self._pool.start)
        self._reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        self._schema_ready: Any = None
        self._pending: collections.OrderedDict[Any, str] = collections.OrderedDict()
        if not sa.local_media_storage_enabled(hs):
            if not all(sa.provider_store_synchronous(hs, type(self))):
                raise sa.storage_config_error(
                    "synapse_msc3916.DedupStorageProvider: store_synchronous: must be true"
                    " when enable_local_media_storage is false (Synapse deletes its"
                    " temporary upload file as soon as the provider returns)"
                )
            self._api.register_spam_checker_callbacks(
                check_media_file_for_spam=self._remember_upload_file
            )
        # Create or upgrade the index as the process starts, not on the first upload, so
        # that a schema problem shows in the log at once.
        self._reactor.callWhenRunning(
            sa.run_as_background_process, hs, "msc3916_storage_schema", self._ensure_schema
        )
        if config.redirect.enabled:
            self._install_redirects()
            if not config.redirect.public_endpoint_url:
                # Browsers reach the bucket itself: say so if its CORS refuses them.
                self._reactor.callWhenRunning(
                    sa.run_as_background_process, hs, "msc3916_storage_cors_check", self._check_cors
                )
        # This process's claims belong to this boot; its heartbeat keeps them held and
        # releases those of boots that stopped beating (see index.boot_heartbeat_txn).
        self._instance = sa.instance_name(hs)
        self._boot = uuid.uuid4().hex
        sa.media_deletions_looping_call(
            self._api, self._heartbeat, index.BOOT_HEARTBEAT_MS, "msc3916_storage_heartbeat"
        )
        self._deletion_job: DeletionJob | None = None
        self._lease: JobLease | None = None
        if config.delete_after_ms is not None:
            # Every process that loads the provider (a media process) may run the job;
            # one at a time does, the one holding its lease in the database.
            tick = tick_interval_ms(config.delete_after_ms)
            self._lease = JobLease(
                self._db, DELETION_JOB, self._boot, self._instance, tick, DELETE_MAX_MS
            )
            # Deletions use short S3 timeouts, like gc's, so that none can still land
            # after an upload took a stale mark over (see lifecycle.GC_DELETE_TIMEOUTS),
            # and threads of their own, one per batch in flight (``delete_jobs``): a
            # delete queued behind uploads in the shared pool could start after its mark
            # was taken over.
            jobs = config.delete_jobs
            deletion_pool = ThreadPool(1, jobs, name="msc3916-storage-deletions")
            self._reactor.callWhenRunning(deletion_pool.start)
            self._reactor.addSystemEventTrigger("during", "shutdown", deletion_pool.stop)

            async def in_deletion_thread(f: Any, *args: Any) -> Any:
                return await sa.defer_to_threadpool(hs, deletion_pool, f, *args)

            deletion_store = gc_storage_config(config)
            if deletion_store.max_pool_connections < jobs:
                deletion_store = attr.evolve(deletion_store, max_pool_connections=jobs)
            self._deletion_job = DeletionJob(
                self._db,
                in_deletion_thread,
                make_blobstore(deletion_store),
                config.delete_after_ms,
                self._lease,
                jobs=jobs,
                gather=sa.gather,
            )
            sa.media_deletions_looping_call(
                self._api, self._deletion_tick, tick, "msc3916_storage_deletions"
            )
            self._reactor.addSystemEventTrigger("before", "shutdown", self._release_lease)
        logger.info("synapse_msc3916: dedup storage provider on %s", self._store.describe())

    def __str__(self) -> str:
        return f"DedupStorageProvider[{self._store.describe()}]"

    @staticmethod
    def parse_config(config: dict[str, Any]) -> StorageConfig:
        sa.check_synapse()
        parsed = StorageConfig.parse(config)
        if parsed.backend == "file":
            assert parsed.directory is not None
            try:
                os.makedirs(parsed.directory, exist_ok=True)
            except OSError as e:
                raise sa.storage_config_error(
                    f"synapse_msc3916: directory: cannot create {parsed.directory}: {e.strerror}"
                ) from None
            if not os.access(parsed.directory, os.W_OK | os.X_OK):
                raise sa.storage_config_error(
                    f"synapse_msc3916: directory: {parsed.directory} is not writable"
                )
        return parsed

    @staticmethod
    def _discover_region(config: StorageConfig) -> StorageConfig:
        """Redirect URLs must be signed for the bucket's region: ask S3 for it at start-up.

        Start-up may block on this (as it may on the schema); a bucket that cannot tell
        its region stops Synapse with one line naming ``region_name``.
        """
        try:
            region = S3BlobStore(config).bucket_region()
        except StorageUnavailable as e:
            why = " ".join(str(e).split())
            raise sa.storage_config_error(
                f"synapse_msc3916: region_name: not set, and the region of bucket"
                f" {config.bucket!r} could not be discovered ({why}); redirect URLs must be"
                " signed for it: set region_name"
            ) from None
        logger.info(
            "synapse_msc3916: bucket %s is in region %s (discovered; region_name skips the"
            " lookup)",
            config.bucket,
            region,
        )
        return attr.evolve(config, region_name=region)

    def _install_redirects(self) -> None:
        """Hand large media to S3 (see storage/redirect.py and synapse_adapter/redirect.py)."""
        store = self._store
        assert isinstance(store, S3BlobStore)  # config refuses redirects on backend: file
        expires = self._config.redirect.expires

        async def sign(sha256: str, content_type: str | None, disposition: str | None) -> str:
            # On the pool: botocore may refresh credentials with blocking HTTP here.
            return str(
                await self._in_thread(store.presign_get, sha256, expires, content_type, disposition)
            )

        async def locate(path: str) -> Any:
            return await self._db("locate", index.locate_txn, path)

        store.signer()  # build the signing client now, not on the first read
        redirector = Redirector(
            self._config.redirect, sign, locate, self._object_present, sa.RedirectingResponder
        )
        sa.install_fetch_hook(redirector.hook)

    async def _check_cors(self) -> None:
        """Read the bucket's CORS rules once, off the reactor; only ever logs."""
        await self._in_thread(cors.startup_check, self._store)

    async def _object_present(self, sha256: str, length: int) -> bool:
        """Before redirecting to an object: is it there, at its length? (see redirect.py)

        A missing object is marked in the index, as a read that finds it missing does, so
        the read falls back to Synapse and the next store of the content rewrites it. When
        S3 cannot answer, the index is trusted: the redirect is what it would have been.
        """
        size = await self._stat_or_trust(sha256, length, "before a redirect")
        if size == length:
            return True
        if size is not None:
            self._corrupt(sha256, f"object is {size} bytes, the index says {length}")
            return False
        logger.error(
            "synapse_msc3916: object %s is indexed but missing; not redirecting to it,"
            " the next store of this content rewrites it",
            sha256,
        )
        STORAGE_DAMAGED.labels(where="redirect", problem="missing").inc()
        try:
            await self._db("mark_missing", index.mark_blob_missing_txn, sha256)
        except Exception:  # best effort: the provider's own read marks it too
            logger.exception("synapse_msc3916: could not mark %s missing", sha256)
        return False

    async def _stat_or_trust(self, sha256: str, length: int, what: str) -> int | None:
        """The object's size, or the index's ``length`` when the store cannot answer: a
        check that S3 cannot make must not turn an outage into refused reads or uploads
        (``scrub`` catches up later)."""
        try:
            return await self._in_thread(self._store.stat, sha256)
        except StorageUnavailable as e:
            STORAGE_ERRORS.labels(operation="verify").inc()
            logger.warning(
                "synapse_msc3916: could not check object %s %s (%s); trusting the index",
                sha256,
                what,
                e,
            )
            return length

    # --- plumbing ---

    async def _in_thread(self, f: Any, *args: Any) -> Any:
        return await sa.defer_to_threadpool(self._hs, self._pool, f, *args)

    async def _db(self, desc: str, func: Any, *args: Any) -> Any:
        await self._ensure_schema()
        return await sa.run_db_read_committed(self._hs, f"msc3916_storage_{desc}", func, *args)

    async def _ensure_schema(self) -> None:
        """Create the index tables on first use, tolerating a concurrent creator.

        PostgreSQL can report a unique violation when two processes run the same
        ``CREATE TABLE IF NOT EXISTS`` at once; the loser only needs to try again.
        """
        if self._schema_ready:
            return
        for attempt in range(5):
            try:
                # READ COMMITTED: a step that scans (the running totals) must see
                # every change committed before it locked the tables.
                await sa.run_db_read_committed(
                    self._hs, "msc3916_storage_schema", index.ensure_schema_txn
                )
                self._schema_ready = True
                break
            except Exception:
                if attempt == 4:
                    raise
                await self._api.sleep(0.2 * (attempt + 1))
        await self._startup()

    async def _startup(self) -> None:
        """The start-up work after the schema, each step in its own transaction.

        A problem here does not stop uploads, and one step's failure does not take
        the others down (a trigger that could not be created once also left the
        claims of a previous life unreleased): each failure is logged with what it
        means.
        """
        results = await run_startup_steps(
            startup_steps(self._instance, self._boot),
            lambda desc, func: self._api.run_db_interaction(f"msc3916_storage_{desc}", func),
            self._api.sleep,
        )
        triggers = results[TRIGGERS_STEP]
        if triggers.ok and triggers.value:
            logger.info("synapse_msc3916: created deletion triggers %s", ", ".join(triggers.value))
        elif triggers.permanent:
            self._deletion_job = None  # its timer then only watches the lease
        claims = results[CLAIMS_STEP]
        if claims.ok and claims.value:
            logger.info("synapse_msc3916: released %d claim(s) of stopped processes", claims.value)

    async def _deletion_tick(self) -> None:
        job, lease = self._deletion_job, self._lease
        if lease is None:
            return
        try:
            if job is None or job.running:
                # This process cannot run the job now; it can still tell if nobody does.
                await lease.check()
            else:
                await job.tick()
        except Exception:
            logger.exception("synapse_msc3916: could not check the storage deletion job's lease")

    async def _heartbeat(self) -> None:
        try:
            released = await self._db(
                "heartbeat", index.boot_heartbeat_txn, self._boot, self._instance
            )
        except Exception:
            logger.exception("synapse_msc3916: the storage heartbeat failed; retrying later")
            return
        if released:
            logger.info("synapse_msc3916: released %d claim(s) of stopped processes", released)

    def _release_lease(self) -> Any:
        """Before shutdown: hand the job on at once (a Deferred the reactor waits for)."""
        lease = self._lease
        if lease is None:
            return None

        async def release() -> None:
            try:
                await lease.release()
            except Exception:  # it then expires by itself
                logger.exception("synapse_msc3916: could not release the storage deletion job's lease")

        return sa.run_as_background_process(self._hs, "msc3916_storage_lease_release", release)

    def _unavailable(self, operation: str, e: Exception) -> Exception:
        STORAGE_ERRORS.labels(operation=operation).inc()
        logger.error("synapse_msc3916: media storage %s failed: %s", operation, e)
        code = 503 if operation == "store" else 502
        return sa.SynapseError(
            code,
            f"Media storage is unavailable ({operation} failed), try again later",
            sa.Codes.UNKNOWN,
        )

    async def _remember_upload_file(self, file_wrapper: Any, file_info: Any) -> Any:
        """Spam-check hook: the only place that sees where a temp-file upload lives.

        With ``enable_local_media_storage: false`` Synapse writes an upload to a
        temporary file, runs the spam checkers on it, calls the providers with the
        relative path only, and deletes the file. Remembering the path here lets the
        following ``store_file`` read it.
        """
        path = getattr(file_wrapper, "path", None)
        if isinstance(path, str):
            self._pending[file_info] = path
            while len(self._pending) > _PENDING_MAX:
                self._pending.popitem(last=False)
        return sa.storage_not_spam()

    # --- store ---

    async def store_file(self, path: str, file_info: Any) -> None:
        if getattr(file_info, "url_cache", False):
            return
        source = self._pending.pop(file_info, None) or os.path.join(self._media_store, path)
        ref = media_ref(file_info)
        kind = file_kind(file_info)
        STORAGE_STORES.labels(kind=kind).inc()

        try:
            size = (await self._in_thread(os.stat, source)).st_size
        except FileNotFoundError:
            # Only happens if Synapse kept no copy and the spam-check hook never told
            # us where the temporary file was; say so rather than a bare traceback.
            STORAGE_ERRORS.labels(operation="store").inc()
            logger.error("synapse_msc3916: cannot read %s to store it (%s)", path, source)
            raise sa.SynapseError(
                500, "Media storage could not read the uploaded file", sa.Codes.UNKNOWN
            ) from None
        known = None
        # Synapse 1.128 and later record it. Only for local media: a remote file is
        # stored before Synapse inserts its row (under a fresh filesystem_id), and a
        # lookup by filesystem_id has no index (it would scan all media of the origin).
        if sa.media_tables_have_sha256() and ref.media_origin is None:
            known = await self._db("synapse_sha256", index.synapse_sha256_txn, ref)
        if known is not None and known[1] == size:
            sha256, length = known
        else:
            sha256, length = await self._in_thread(hash_file, source)

        # The claim is this upload's reference on the content until its path is
        # recorded: no deletion can take the object meanwhile, however long this takes.
        claim = index.Claim(uuid.uuid4().hex, path, self._instance, self._boot)
        deadline = time.monotonic() + _WAIT_FOR_GC_SECONDS
        while True:
            decision, overwrite = await self._db(
                "claim", index.claim_blob_txn, sha256, length, index.now_ms(), claim
            )
            if decision != index.WAIT:
                break
            if time.monotonic() > deadline:
                raise self._unavailable("store", TimeoutError("blob is being deleted by gc"))
            await self._api.sleep(0.25)

        healing = written = False
        try:
            if decision == index.HIT:
                # A dedup hit trusts an object nobody has looked at since it was written: one
                # HEAD makes sure it is still there (a lifecycle rule, an operator, a lost
                # race may have removed it) and rewrites it if not, before the user gets 200.
                # When the store cannot answer, the index is trusted as before: a dedup hit
                # keeps working through an S3 outage (``scrub`` catches up later).
                size = await self._stat_or_trust(sha256, length, "of a dedup hit")
                if size != length:
                    problem = "missing" if size is None else "wrong_size"
                    STORAGE_DAMAGED.labels(where="store", problem=problem).inc()
                    logger.warning(
                        "synapse_msc3916: object %s is %s, rewriting it from this upload",
                        sha256,
                        "missing" if size is None else f"{size} bytes instead of {length}",
                    )
                    await self._db("mark_missing", index.mark_blob_missing_txn, sha256)
                    decision, overwrite, healing = index.WRITE, size is not None, True

            written = False
            if decision == index.WRITE:
                try:
                    written = await self._in_thread(
                        self._store.put_file, sha256, source, length, overwrite
                    )
                except StorageUnavailable as e:
                    raise self._unavailable("store", e) from e
            try:
                await self._db(
                    "record_path",
                    index.record_path_txn,
                    path,
                    sha256,
                    length,
                    ref,
                    index.now_ms(),
                    True,
                    claim,
                )
            except index.LostClaim as e:
                # Acknowledging would promise bytes a deletion may be taking: fail it.
                raise self._unavailable("store", e) from e
        except BaseException:
            await self._release_claim(claim)
            raise
        if written:
            STORAGE_BYTES_WRITTEN.inc(length)
            if overwrite or healing:
                STORAGE_HEALS.inc()
                logger.info("synapse_msc3916: rewrote damaged object %s", sha256)
        else:
            STORAGE_DEDUP_HITS.inc()
            STORAGE_BYTES_SAVED.inc(length)
        logger.debug(
            "synapse_msc3916: stored %s as %s (%s)", path, sha256, "new" if written else "dedup"
        )

    async def _release_claim(self, claim: index.Claim) -> None:
        try:
            await self._db("release_claim", index.release_claim_txn, claim.token, index.now_ms())
        except Exception:
            # Released when this boot stops beating (index.BOOT_STALE_MS after it ends),
            # or by gc after CLAIM_STALE_MS.
            logger.exception("synapse_msc3916: could not release the claim of %s", claim.path)

    # --- fetch ---

    async def fetch(self, path: str, file_info: Any) -> Any:
        if getattr(file_info, "url_cache", False):
            return None
        started = time.monotonic()
        located = await self._db("locate", index.locate_txn, path)
        if located is None or not located.servable:
            responder = await self._fetch_legacy(path)
            STORAGE_FETCHES.labels(result="legacy" if responder else "missing").inc()
            return responder
        try:
            reader, prefetched = await self._in_thread(
                _open_and_read_small, self._store, located.sha256, located.length
            )
        except StorageUnavailable as e:
            raise self._unavailable("fetch", e) from e
        if reader is None:
            logger.error(
                "synapse_msc3916: %s is indexed as %s but the object is missing;"
                " the next store of this content rewrites it",
                path,
                located.sha256,
            )
            STORAGE_FETCHES.labels(result="missing_object").inc()
            STORAGE_DAMAGED.labels(where="fetch", problem="missing").inc()
            try:
                await self._db("mark_missing", index.mark_blob_missing_txn, located.sha256)
            except Exception:  # best effort: the read's answer must not depend on it
                logger.exception("synapse_msc3916: could not mark %s missing", located.sha256)
            return await self._fetch_legacy(path)
        if reader.size != located.length:
            reader.close()
            self._corrupt(
                located.sha256, f"object is {reader.size} bytes, the index says {located.length}"
            )
            return None
        STORAGE_FETCHES.labels(result="hit").inc()
        STORAGE_FETCH_LATENCY.observe(time.monotonic() - started)
        sha256 = located.sha256
        return self._responder(reader, located.length, sha256, prefetched)

    async def _fetch_legacy(self, path: str) -> Any:
        """A read miss may still be an object synapse-s3-storage-provider wrote."""
        if self._config.legacy_prefix is None or not isinstance(self._store, S3BlobStore):
            return None
        try:
            reader = await self._in_thread(self._store.open_key, self._config.legacy_prefix + path)
        except StorageUnavailable as e:
            raise self._unavailable("fetch", e) from e
        if reader is None:
            return None
        return self._responder(reader, reader.size, None)

    def _responder(
        self, reader: Any, length: int, sha256: str | None, prefetched: Any = None
    ) -> BlobResponder:
        return BlobResponder(
            prefetched=prefetched,
            reader=reader,
            read_in_thread=lambda f: self._in_thread(f),
            run_in_background=self._run_in_background,
            make_yieldable=self._make_yieldable,
            reactor=self._reactor,
            length=length,
            sha256=sha256,
            on_corrupt=lambda why: self._corrupt(sha256 or "", why),
            stall_timeout=self._config.stall_timeout_ms / 1000,
        )

    @staticmethod
    def _run_in_background(f: Any, *args: Any) -> Any:
        from synapse.module_api import run_in_background

        return run_in_background(f, *args)

    @staticmethod
    def _make_yieldable(d: Any) -> Any:
        from synapse.module_api import make_deferred_yieldable

        return make_deferred_yieldable(d)

    def _corrupt(self, sha256: str, why: str) -> None:
        """Never serve this blob again; an upload of the same content rewrites it."""
        STORAGE_CORRUPTIONS.inc()
        logger.error("synapse_msc3916: stored object %s is corrupt: %s", sha256, why)
        if not sha256:
            return

        async def mark() -> None:
            try:
                await self._db("mark_corrupt", index.mark_corrupt_txn, sha256)
            except Exception:
                logger.exception("synapse_msc3916: could not mark %s corrupt", sha256)

        self._run_in_background(mark)


__all__ = ["DedupStorageProvider"]
