"""``synapse-msc3916 migrate|gc|stats``: the provider's offline tools.

Synapse never tells a storage provider that media was deleted, and never moves what
another provider stored; these commands do both, working on the same database and
bucket as the running server. They are safe to run while Synapse runs: every change
follows the same claim/grace protocol as uploads (see ``index.py``), so a GC racing an
upload of the same content never deletes what the upload relies on.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import attr

from synapse_msc3916 import homeserver_config as hc
from synapse_msc3916.config import ConfigError, StorageConfig, parse_duration_ms
from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import (
    CopyUnsupported,
    S3BlobStore,
    StorageUnavailable,
    hash_blob,
    make_blobstore,
)
from synapse_msc3916.storage.lifecycle import (  # noqa: F401 (GC_DELETE_TIMEOUTS re-exported)
    GC_DELETE_TIMEOUTS,
    MAX_KEYS_PER_DELETE,
    TOMBSTONE_BATCH,
    delete_if_in_time,
    gc_storage_config,
    mark_batch_txn,
    object_missing_after_lost_mark,
    settle_batch_txn,
    unmark_batch_txn,
)
from synapse_msc3916.storage.parallel import (
    Connections,
    RateLimiter,
    default_jobs,
    kill_point,
    run_ordered,
)
from synapse_msc3916.storage.progress import Progress
from synapse_msc3916.storage.provider import hash_file
from synapse_msc3916.storage.runs import Resume, ToolRun, last_rate

MEDIA_DIRS = ("local_content", "local_thumbnails", "remote_content", "remote_thumbnail")


def parse_duration(text: str) -> float:
    """A command-line duration, as seconds: what the provider's config takes (``30s``,
    ``15m``, ``24h``, ``7d``, ``2w`` or plain seconds), by the same parser."""
    try:
        return parse_duration_ms(text, "duration") / 1000
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("synapse_msc3916: duration: ")) from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class Context:
    def __init__(self, config_path: str, jobs: int | None = None):
        self.config = hc.load(config_path)
        entry = hc.provider_entry(self.config)
        if entry is None:
            raise hc.ToolError(
                f"{config_path} has no {hc.PROVIDER_NAME} entry under media_storage_providers"
            )
        try:
            self.storage = StorageConfig.parse(entry.get("config"))
        except Exception as e:  # ConfigError names the key
            raise hc.ToolError(str(e)) from None
        self.media_store = str(self.config.get("media_store_path") or "media_store")
        # ``--jobs`` workers, each with its own S3 connection (boto3 discards, and
        # warns about, connections beyond its pool).
        self.jobs = jobs or default_jobs(self.storage.backend)
        if self.storage.max_pool_connections < self.jobs:
            self.storage = attr.evolve(self.storage, max_pool_connections=self.jobs)
        self.store = make_blobstore(self.storage)


class Timer:
    """Elapsed time and rate of this process's share of a run, for ``--json``."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.count = 0

    def summary(self, stats: dict[str, Any], args: argparse.Namespace, jobs: int) -> float | None:
        elapsed = time.monotonic() - self.start
        rate = self.count / elapsed if elapsed > 0 and self.count else None
        stats["elapsed_seconds"] = round(elapsed, 3)
        stats["objects_per_second"] = None if rate is None else round(rate, 1)
        stats["jobs"] = jobs
        stats["max_rate"] = getattr(args, "max_rate", None)
        return rate


def _resumed(tool: str, resume: Resume, stats: dict[str, Any]) -> None:
    """Take the counters of the interrupted run over and say where this one starts."""
    stats["resumed_from"] = resume.cursor
    if resume.cursor:
        stats.update({k: v for k, v in (resume.stats or {}).items() if k in stats})
        Progress.write(
            f"{tool}: resuming an interrupted run after {resume.cursor}"
            f" ({resume.done} objects were done)",
            file=sys.stderr,
        )


# Entries a tool's ``--json`` lists (``broken``, ``deleted``) keep at most: the first found
# over the whole run, resumed parts included. Everything else is only counted (and
# ``scrub`` prints every problem as it finds it), so memory does not grow with them.
EXAMPLES = 100


def _counters(stats: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint keeps of a tool's stats: the numbers and the example lists
    (capped at ``EXAMPLES``), so that a resumed run reports the whole run."""
    return {
        k: v
        for k, v in stats.items()
        if isinstance(v, list) or (isinstance(v, int | float) and not isinstance(v, bool))
    }


def _example(stats: dict[str, Any], key: str, entry: Any) -> None:
    """Keep ``entry`` in the list ``stats[key]`` while it holds fewer than ``EXAMPLES``."""
    if len(stats[key]) < EXAMPLES:
        stats[key].append(entry)


def _open(ctx: Context) -> Any:
    return hc.open_database(ctx.config)


# --- migrate -------------------------------------------------------------------------


def _iter_media_store(root: str, after: str = "") -> Iterator[tuple[str, str, int]]:
    """Every file of the media store, in path order (name by name, so that a cursor is
    a path), only those after ``after``: a resumed run skips whole directories."""
    cursor = after.split("/") if after else None

    def walk(folder: str, parts: list[str]) -> Iterator[tuple[str, str, int]]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for entry in entries:
            here = [*parts, entry.name]
            if entry.is_dir(follow_symlinks=False):
                if cursor is None or here >= cursor[: len(here)]:
                    yield from walk(entry.path, here)
            elif cursor is None or here > cursor:
                try:
                    size = os.path.getsize(entry.path)
                except OSError:
                    continue
                yield "/".join(here), entry.path, size

    for top in MEDIA_DIRS:
        yield from walk(os.path.join(root, top), [top])


# What became of one source file: only the first three allow deleting a legacy source.
WRITTEN, DEDUPLICATED, VERIFIED = "written", "deduplicated", "verified"
MISMATCH, UNVERIFIED = "hash_mismatch", "unverified"
# A local file not migrated: still being written, or recorded by the provider meanwhile.
INCOMPLETE, RECORDED_MEANWHILE = "skipped_incomplete", "recorded_meanwhile"


# Remote rows per page of :class:`SynapseRows` (about 0.4 KiB each in memory).
ROWS_PAGE = 20_000


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _RowsPage:
    """Synapse's rows of one origin's media (or thumbnails) whose ``filesystem_id`` is in
    ``[start, end)`` (``end`` None: up to the last)."""

    group: tuple[str, bool]
    start: str
    end: str | None
    rows: dict[Any, tuple[int | None, str | None]]

    def covers(self, group: tuple[str, bool], file_id: str) -> bool:
        return group == self.group and self.start <= file_id and (
            self.end is None or file_id < self.end
        )


class SynapseRows:
    """What Synapse recorded for the files being migrated: length and SHA-256. One
    instance serves every worker (each passes its own connection).

    Local media are looked up one by one (``media_id`` is Synapse's key). Remote paths
    name a ``filesystem_id``, which Synapse does not index, so a lookup per file would
    read all of the origin's rows each time; holding all of an origin's rows instead
    grew with the origin (0.3-0.4 KiB a media: gigabytes for 10^6 media of one origin
    across 16 workers). The files of an origin are listed in ``filesystem_id`` order
    (the path is ``origin/ab/cd/rest`` with fixed-length parts), so the rows are read in
    pages of that order, ``ROWS_PAGE`` at a time (one pass over the origin's index range
    each), and at most two pages are kept: the current one and the one before, for the
    files other workers still have in flight. A row inserted after its page was read
    makes its file look unfinished: it is skipped and reported, and migrated by the next
    run.
    """

    def __init__(self, has_sha_column: bool, page_size: int = ROWS_PAGE):
        self._has_sha = has_sha_column
        self._page_size = page_size
        self._pages: list[_RowsPage] = []
        self._lock = threading.Lock()

    @property
    def rows_held(self) -> int:
        return sum(len(p.rows) for p in self._pages)

    def _remote(self, db: Any, ref: index.MediaRef) -> tuple[int | None, str | None] | None:
        assert ref.media_origin is not None
        group = (ref.media_origin, ref.thumbnail_width is not None)
        key: Any = ref.file_id
        if group[1]:
            key = (ref.file_id, ref.thumbnail_width, ref.thumbnail_height,
                   ref.thumbnail_type, ref.thumbnail_method)
        with self._lock:  # the others wait for the page they would read too
            for page in self._pages:
                if page.covers(group, ref.file_id):
                    return page.rows.get(key)
            page = self._read_page(db, group, ref.file_id)
            self._pages = [p for p in self._pages[-1:] if p.group == group] + [page]
            return page.rows.get(key)

    def _read_page(self, db: Any, group: tuple[str, bool], start: str) -> _RowsPage:
        origin, thumbs = group
        found = index.run_tool_txn(
            db, index.remote_rows_page_txn, origin, thumbs, self._has_sha, start, self._page_size
        )
        if len(found) < self._page_size:
            return _RowsPage(group, start, None, dict(found))
        # A full page may end part-way through its last filesystem_id's rows
        # (thumbnails): it covers up to that one, excluded.
        last = found[-1][0][0] if thumbs else found[-1][0]
        rows = {k: v for k, v in found if (k[0] if thumbs else k) != last}
        if rows:
            return _RowsPage(group, start, last, rows)
        # One filesystem_id with a page of thumbnails or more: all of its own.
        everything = index.run_tool_txn(
            db, index.remote_rows_page_txn, origin, thumbs, self._has_sha, start, 0
        )
        return _RowsPage(group, start, start + "\0", dict(everything))

    def length(self, db: Any, ref: index.MediaRef) -> int | None:
        if ref.media_origin is not None:
            row = self._remote(db, ref)
            return None if row is None else row[0]
        return index.run_tool_txn(db, index.synapse_length_txn, ref)  # type: ignore[no-any-return]

    def sha256(self, db: Any, ref: index.MediaRef) -> tuple[str, int] | None:
        """What Synapse recorded for this media, when its release records it (1.128+)."""
        if not self._has_sha or ref.thumbnail_width is not None:
            return None
        if ref.media_origin is not None:
            row = self._remote(db, ref)
            if row is None or row[0] is None or not row[1]:
                return None
            return row[1], row[0]
        return index.run_tool_txn(db, index.synapse_sha256_txn, ref)  # type: ignore[no-any-return]


def _has_sha256_column(db: Any) -> bool:
    txn = index.ToolTxn(db)
    try:
        txn.execute("SELECT sha256 FROM local_media_repository WHERE 1 = 0", ())
        txn.fetchall()
        return True
    except Exception:
        return False
    finally:
        db.conn.rollback()


def _verify_copy(store: Any, sha256: str, length: int) -> bool:
    """Read the stored object back: is its SHA-256 its name and its length the index's?"""
    return hash_blob(store, sha256) == (sha256, length)


def _store_one(
    db: Any,
    store: Any,
    path: str,
    ref: index.MediaRef,
    local_file: str | None,
    legacy_key: str | None,
    rows: SynapseRows,
    expected_length: int | None = None,
    copy: ServerSideCopy | None = None,
    notes: list[str] | None = None,
) -> str:
    """Index one file from a source; returns what happened (``WRITTEN``, ...).

    A legacy object whose SHA-256 Synapse recorded is copied inside the bucket when
    ``copy`` allows (``_copy_one``). Otherwise the source's bytes are hashed here: the
    SHA-256 Synapse recorded is only compared with it, never trusted in its place, so a
    legacy object with bit rot is not copied under a name that is not its content. A
    legacy source is then verified in the store by reading the object back before
    anyone may delete the source.
    """
    known = rows.sha256(db, ref)
    if (
        legacy_key is not None
        and known is not None
        and copy is not None
        and copy.enabled
        and isinstance(store, S3BlobStore)
        and known[1] <= store.COPY_MAX_BYTES
    ):
        try:
            outcome = _copy_one(
                db, store, path, ref, legacy_key, known, notes if notes is not None else []
            )
            if outcome is not None:
                return outcome
        except CopyUnsupported as e:
            copy.refused(str(e))
    tmp: str | None = None
    try:
        if local_file is None:
            assert legacy_key is not None and isinstance(store, S3BlobStore)
            tmp = _download(store, legacy_key)
            local_file = tmp
        sha256, length = hash_file(local_file)
        if expected_length is not None and length != expected_length:
            _report_incomplete(path, length, expected_length)
            return INCOMPLETE
        if known is not None and known != (sha256, length):
            Progress.write(
                f"migrate: {path}: content has SHA-256 {sha256} ({length} bytes) but Synapse"
                f" recorded {known[0]} ({known[1]} bytes); not migrated, source kept",
                file=sys.stderr,
            )
            return MISMATCH
        claim = _new_claim(path)
        decision, overwrite = _claim(db, sha256, length, claim)
        kill_point()
        try:
            if decision == index.HIT and store.stat(sha256) != length:
                # The index says stored, the store disagrees: heal it from this source.
                index.run_tool_txn(db, index.mark_blob_missing_txn, sha256)
                decision, overwrite = index.WRITE, True
            written = False
            if decision == index.WRITE:
                written = store.put_file(sha256, local_file, length, overwrite)
                kill_point()
            if legacy_key is not None and not _verify_copy(store, sha256, length):
                index.run_tool_txn(db, index.mark_blob_missing_txn, sha256)
                Progress.write(
                    f"migrate: {path}: the copy {sha256} does not read back with its hash;"
                    " not indexed, source kept",
                    file=sys.stderr,
                )
                index.run_tool_txn(db, index.release_claim_txn, claim.token, index.now_ms())
                return UNVERIFIED
            if legacy_key is None:
                # Never over a path recorded meanwhile: the provider stored the complete
                # content Synapse wrote, this is only a reading of the file on disk.
                if not index.run_tool_txn(
                    db, index.record_path_if_absent_txn, path, sha256, length, ref,
                    index.now_ms(), claim,
                ):
                    return RECORDED_MEANWHILE
            else:
                index.run_tool_txn(
                    db, index.record_path_txn, path, sha256, length, ref, index.now_ms(),
                    True, claim,
                )
        except BaseException:
            index.run_tool_txn(db, index.release_claim_txn, claim.token, index.now_ms())
            raise
        return WRITTEN if written else DEDUPLICATED
    finally:
        if tmp is not None:
            os.unlink(tmp)


def _new_claim(path: str) -> index.Claim:
    return index.Claim(uuid.uuid4().hex, path, f"cli:{socket.gethostname()}:{os.getpid()}")


def _claim(
    db: Any, sha256: str, length: int, claim: index.Claim, txn_func: Any = index.claim_blob_txn
) -> Any:
    """``claim_blob_txn`` (or ``txn_func``), waiting up to a minute while a deletion
    deletes the object."""
    for _ in range(240):
        answer = index.run_tool_txn(db, txn_func, sha256, length, index.now_ms(), claim)
        if answer[0] != index.WAIT:
            return answer
        time.sleep(0.25)
    raise hc.ToolError(f"{sha256} stayed locked by another gc for a minute")


class ServerSideCopy:
    """Whether ``migrate`` may copy legacy objects with ``CopyObject``: yes unless
    ``--no-server-side-copy``, and no longer once the store refused it as unsupported
    (said once; every later source is downloaded and uploaded)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._lock = threading.Lock()

    def refused(self, why: str) -> None:
        with self._lock:
            if not self.enabled:
                return
            self.enabled = False
        Progress.write(
            f"migrate: the store refuses server-side copies ({why}); downloading and"
            " uploading every source instead",
            file=sys.stderr,
        )


def _copy_one(
    db: Any,
    store: S3BlobStore,
    path: str,
    ref: index.MediaRef,
    legacy_key: str,
    known: tuple[str, int],
    notes: list[str],
) -> str | None:
    """Store a legacy object by ``CopyObject`` under the SHA-256 Synapse recorded for it;
    None when it must be downloaded and uploaded instead.

    The same claim protocol as a download, but the bytes are never seen here: the copy
    is named by what Synapse recorded and verified once written, by the SHA-256 S3
    computed for it when S3 returns one, else by reading it back. Until then it is a
    name that may not be its content, so a copy is made only where
    ``claim_for_copy_txn`` allows it (a new object nobody else is storing, marked so
    that nobody trusts it), and never replaces an object (conditional, like an upload):
    a damaged or half-deleted object is rewritten from downloaded, hashed bytes. A copy
    that does not verify (bit rot in the source) is not indexed, is deleted the way
    ``gc`` deletes, and its source is kept. A dedup hit copies nothing: the stored
    object is read back, as for a download.
    """
    sha256, length = known
    claim = _new_claim(path)
    decision, _overwrite, may_copy = _claim(db, sha256, length, claim, index.claim_for_copy_txn)
    kill_point()
    try:
        written, checksum = False, None
        if decision == index.HIT and store.stat(sha256) != length:
            index.run_tool_txn(db, index.mark_blob_missing_txn, sha256)
            decision = index.WRITE  # to be rewritten: not by a copy
        if decision == index.WRITE and not may_copy:
            index.run_tool_txn(db, index.release_claim_txn, claim.token, index.now_ms())
            return None
        if decision == index.WRITE:
            written, checksum = store.copy_key_to_blob(legacy_key, sha256)
            if written:
                notes.append("copied_server_side")
            kill_point()
        if checksum is not None:
            actual: tuple[str, int] | None = (checksum, length)
            notes.append("verified_by_checksum")
        else:
            actual = hash_blob(store, sha256)
            if decision == index.WRITE:
                notes.append("verified_by_read_back")
        if actual != (sha256, length):
            index.run_tool_txn(db, index.mark_blob_missing_txn, sha256)
            index.run_tool_txn(db, index.release_claim_txn, claim.token, index.now_ms())
            found = "missing" if actual is None else f"{actual[0]} ({actual[1]} bytes)"
            if not written:
                Progress.write(
                    f"migrate: {path}: the stored object {sha256} reads back as {found};"
                    " not indexed, source kept",
                    file=sys.stderr,
                )
                return UNVERIFIED
            Progress.write(
                f"migrate: {path}: its server-side copy has SHA-256 {found} but Synapse"
                f" recorded {sha256} ({length} bytes); not migrated, source kept",
                file=sys.stderr,
            )
            _discard_copy(db, store, sha256, length)
            return MISMATCH
        index.run_tool_txn(
            db, index.record_path_txn, path, sha256, length, ref, index.now_ms(), True, claim
        )
    except BaseException:
        index.run_tool_txn(db, index.release_claim_txn, claim.token, index.now_ms())
        raise
    return WRITTEN if written else DEDUPLICATED


def _discard_copy(db: Any, store: S3BlobStore, sha256: str, length: int) -> None:
    """Delete a copy that is not its name's content, the way ``gc`` deletes: under a
    deletion's mark, which only a blob nothing references or claims can take. Left in
    place (marked corrupt: the next store overwrites it) when an upload claimed it
    meanwhile or the store refuses the delete; ``gc`` removes it later otherwise."""
    gen = index.run_tool_txn(db, index.blob_gen_txn, sha256)
    if gen is None:
        return
    try:
        _delete_chunk(db, store, [(sha256, length, gen)])
    except StorageUnavailable as e:
        Progress.write(f"migrate: could not delete the bad copy {sha256}: {e}", file=sys.stderr)


def _report_incomplete(path: str, length: int, expected: int | None) -> None:
    recorded = "no media row" if expected is None else f"its media row says {expected} bytes"
    Progress.write(
        f"migrate: {path}: {length} bytes on disk but Synapse has {recorded} (still being"
        " written, or damaged); not migrated",
        file=sys.stderr,
    )


def _check_local_file(
    db: Any, rows: SynapseRows, path: str, ref: index.MediaRef, local_file: str, min_age: float
) -> tuple[str | None, int | None]:
    """Whether a file of the local media store is complete: (reason to skip, length).

    Synapse writes downloads and uploads in place at their final path and inserts the
    media row once the file is complete, so only a file as long as its row says and
    not modified for ``min_age`` seconds is a finished file. (A half-written file would
    otherwise be stored under the hash of its first bytes, which ``scrub --hash``
    cannot tell from sound content.)
    """
    try:
        st = os.stat(local_file)
    except FileNotFoundError:
        return "skipped", None  # deleted by Synapse since the listing
    if time.time() - st.st_mtime < min_age:
        return "skipped_recent", None
    expected = rows.length(db, ref)
    if expected != st.st_size:
        _report_incomplete(path, st.st_size, expected)
        return INCOMPLETE, None
    return None, expected


def _download(store: S3BlobStore, key: str) -> str:
    reader = store.open_key(key)
    if reader is None:
        raise StorageUnavailable(f"{key} vanished during the migration")
    fd, tmp = tempfile.mkstemp(prefix="msc3916-migrate-")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := reader.read(1 << 20):
                out.write(chunk)
    finally:
        reader.close()
    return tmp


Source = tuple[str, "str | None", int, "str | None"]  # path, local file, size, legacy key


def _synapse_media_count_txn(txn: index.Txn) -> int:
    """How many files Synapse's media tables describe: the progress bar's total (an
    estimate: a media only in a provider, or a file with no row, counts differently)."""
    total = 0
    for table in (
        "local_media_repository",
        "local_media_repository_thumbnails",
        "remote_media_cache",
        "remote_media_cache_thumbnails",
    ):
        txn.execute(f"SELECT COUNT(*) FROM {table}", ())
        total += int(txn.fetchone()[0])
    return total


def _duplicate_bytes_txn(txn: index.Txn) -> int:
    """Bytes that de-duplication saves among the originals whose SHA-256 Synapse recorded
    (1.128+; thumbnails and older media are not counted): one aggregate query."""
    saved = 0
    for table in ("local_media_repository", "remote_media_cache"):
        txn.execute(
            f"SELECT COALESCE(SUM(n * len - len), 0) FROM (SELECT COUNT(*) AS n,"
            f" MAX(media_length) AS len FROM {table} WHERE sha256 IS NOT NULL"
            " GROUP BY sha256) AS d",
            (),
        )
        saved += int(txn.fetchone()[0] or 0)
    return saved


def cmd_migrate(args: argparse.Namespace) -> int:
    """Load an existing media store or synapse-s3-storage-provider prefix into the store.

    Resumable: a path already in the index is skipped, and the run's cursor (the last
    source path before which everything is done, in listing order) is kept in the
    database, so a killed run started again goes on where it stopped. A file of the
    local media store is migrated only once complete (as long as its Synapse row says,
    not modified for ``--min-age``), and never over a path the provider recorded
    meanwhile. Safe by default: a legacy source object is deleted only once its copy
    (server-side where safe, see ``_copy_one``) has been verified to have the right
    SHA-256, by S3's checksum of the copy or by reading it back (for an already indexed
    path too, so a
    destination object lost since the first run is restored from the source, never
    deleted with it), and a source whose bytes do not match the SHA-256 Synapse
    recorded is not migrated at all. ``--jobs`` sources are migrated at once, each by a
    worker with its own database connection. Exit code 1 when some file was left
    unmigrated.
    """
    parallel_defaults(args)
    ctx = Context(args.config, args.jobs)
    legacy = args.from_legacy_prefix
    prefix: str | None = None
    if legacy is not None:
        if not isinstance(ctx.store, S3BlobStore):
            raise hc.ToolError("--from-legacy-prefix needs backend: s3")
        prefix = legacy if isinstance(legacy, str) else ctx.storage.legacy_prefix
        if prefix is None:
            raise hc.ToolError("no prefix given and legacy_prefix is not configured")

    def sources(after: str) -> Iterator[tuple[str, Source]]:
        if prefix is not None:
            # Blob names (ab/cd/<sha256>) never parse as media paths, so a legacy prefix
            # that also contains the blobs is safe: only media paths are migrated.
            assert isinstance(ctx.store, S3BlobStore)
            for info in ctx.store.list_keys(prefix, after):
                yield info.name, (info.name, None, info.size, prefix + info.name)
        else:
            for rel, full, size in _iter_media_store(ctx.media_store, after):
                yield rel, (rel, full, size, None)

    stats: dict[str, Any] = {
        "files": 0,
        "already": 0,
        "skipped": 0,
        "written": 0,
        "deduplicated": 0,
        "restored": 0,
        "bytes": 0,
        "legacy_deleted": 0,
        "legacy_kept_unverified": 0,
        "hash_mismatch": 0,
        "skipped_incomplete": 0,
        "skipped_recent": 0,
        "copied_server_side": 0,
        "verified_by_checksum": 0,
        "verified_by_read_back": 0,
    }
    copy = ServerSideCopy(prefix is not None and not args.no_server_side_copy)
    if args.dry_run:
        stats.update(pending=0, pending_bytes=0)
    limiter = RateLimiter(args.max_rate)
    timer = Timer()
    with _open(ctx) as db:
        index.run_tool_txn(db, index.ensure_schema_txn)
        has_sha = _has_sha256_column(db)
        signature = f"legacy:{prefix}" if prefix is not None else "local"
        if args.keep_source:
            signature += " keep-source"
        run = None if args.dry_run else ToolRun(ctx.config, db, "migrate", signature, args.restart)
        active = run.active() if run else nullcontext(
            Resume(None, 0, None, last_rate(db, "migrate"))
        )
        with Connections(ctx.config) as conns, active as resume:
            _resumed("migrate", resume, stats)
            total = index.run_tool_txn(db, _synapse_media_count_txn)
            progress = Progress("migrate", total, initial=resume.done)
            probe: list[Source] = []

            rows = SynapseRows(has_sha)

            def work(item: Source) -> list[str]:
                return _migrate_item(conns.get(), ctx.store, rows, item, args, copy)

            def done(item: Source, keys: list[str]) -> None:
                progress.step()
                timer.count += 1
                for key in keys:
                    stats[key] += 1
                if "files" in keys:
                    stats["bytes"] += item[2]
                if "pending" in keys:
                    stats["pending_bytes"] += item[2]
                    if len(probe) < _PROBE:
                        probe.append(item)

            def checkpoint(key: str) -> None:
                if run is not None:
                    run.checkpoint(key, resume.done + timer.count, _counters(stats))

            try:
                run_ordered(
                    sources(resume.cursor or ""), work, ctx.jobs, limiter, done, checkpoint
                )
            except StorageUnavailable as e:
                raise hc.ToolError(str(e)) from None
            finally:
                progress.close()
            rate = timer.summary(stats, args, ctx.jobs)
            if args.dry_run:
                _estimate(ctx, stats, probe, resume.last_rate, db, conns)
        if run is not None:
            run.finish(rate)
    _report("migrate", stats, args)
    failed = (
        stats["legacy_kept_unverified"]
        + stats["hash_mismatch"]
        + stats["skipped_incomplete"]
        + stats["skipped_recent"]
    )
    if failed:
        print(
            f"migrate: {failed} file(s) could not be migrated safely and were left"
            " where they are (see above; skipped_recent: modified within --min-age,"
            " run again later)",
            file=sys.stderr,
        )
        return 1
    return 0


# Sources a dry run reads and hashes to measure a rate when no migrate finished before.
_PROBE = 100


def _estimate(
    ctx: Context,
    stats: dict[str, Any],
    probe: list[Source],
    rate: float | None,
    db: Any,
    conns: Connections,
) -> None:
    """A dry run's plan: what is left, the bytes duplicates save, and the time it takes at
    the rate of the last finished ``migrate`` (or, before any, of a probe that reads and
    hashes a few pending sources and looks up their objects: the read half of a
    migration, so a lower bound of the time)."""
    stats["estimated_bytes_saved"] = index.run_tool_txn(db, _duplicate_bytes_txn)
    basis = "last migrate run"
    if rate is None and probe:
        start = time.monotonic()

        def read(item: Source) -> None:
            _path, local_file, _size, legacy_key = item
            tmp = None
            try:
                if local_file is None:
                    assert legacy_key is not None and isinstance(ctx.store, S3BlobStore)
                    tmp = local_file = _download(ctx.store, legacy_key)
                sha256, _length = hash_file(local_file)
                ctx.store.stat(sha256)
            except (OSError, StorageUnavailable):
                pass
            finally:
                if tmp is not None:
                    os.unlink(tmp)

        run_ordered(
            ((str(n), item) for n, item in enumerate(probe)), read, ctx.jobs,
            RateLimiter(None), lambda _i, _r: None, lambda _k: None,
        )
        rate = len(probe) / max(time.monotonic() - start, 1e-6)
        basis = f"probe of {len(probe)} files (reads only)"
    stats["estimated_rate"] = None if rate is None else round(rate, 1)
    stats["estimated_rate_basis"] = basis if rate is not None else None
    stats["estimated_seconds"] = (
        None if not rate else round(stats["pending"] / rate, 1)
    )


def _migrate_item(
    db: Any,
    store: Any,
    rows: SynapseRows,
    item: Source,
    args: argparse.Namespace,
    copy: ServerSideCopy,
) -> list[str]:
    """Migrate one source (in a worker thread); the counters it adds to."""
    path, local_file, _size, legacy_key = item
    ref = index.parse_media_path(path)
    if ref is None:
        return ["skipped"]
    located = index.run_tool_txn(db, index.locate_txn, path)
    expected: int | None = None
    if local_file is not None and located is None:
        skip, expected = _check_local_file(db, rows, path, ref, local_file, args.min_age)
        if skip is not None:
            return ["files", skip]
    if args.dry_run:
        return ["files", "already" if located is not None else "pending"]
    notes: list[str] = []
    try:
        outcome = _migrate_one(
            db, store, path, ref, local_file, legacy_key, located, rows, expected,
            copy, notes,
        )
    except index.LostClaim as e:
        # gc released this run's claim (older than a day) while it stored: the path is
        # not recorded and the source is kept; a new run starts afresh.
        raise hc.ToolError(f"{path}: {e}; not migrated, source kept: run migrate again") from None
    if outcome in (VERIFIED, RECORDED_MEANWHILE):
        keys = ["files", "already", *notes]
    elif outcome == INCOMPLETE:
        return ["files", INCOMPLETE]
    elif outcome in (WRITTEN, DEDUPLICATED) and located is not None:
        # The index pointed at a missing or damaged object: it is whole again, from
        # this source, but the source stays until a later run finds the index and the
        # store agreeing on their own.
        return ["files", "restored", *notes]
    elif outcome in (WRITTEN, DEDUPLICATED):
        keys = ["files", outcome, *notes]
    else:
        # Never delete a source whose copy is not verified.
        return ["files", MISMATCH if outcome == MISMATCH else "legacy_kept_unverified", *notes]
    if legacy_key is not None and not args.keep_source:
        assert isinstance(store, S3BlobStore)
        kill_point()
        store.delete_key(legacy_key)
        keys.append("legacy_deleted")
    return keys


def _migrate_one(
    db: Any,
    store: Any,
    path: str,
    ref: index.MediaRef,
    local_file: str | None,
    legacy_key: str | None,
    located: index.Located | None,
    rows: SynapseRows,
    expected_length: int | None = None,
    copy: ServerSideCopy | None = None,
    notes: list[str] | None = None,
) -> str:
    """Migrate one path, or check that an earlier run did; returns what happened.

    An indexed path from the local media store is left alone (nothing will be
    deleted). An indexed path from a legacy prefix is verified in the store first: its
    object must read back with its hash before the legacy source may go. An object
    found missing or damaged is stored again from the source, like a new one.
    """
    if located is not None and legacy_key is None:
        return VERIFIED
    if located is not None:
        if located.servable and _verify_copy(store, located.sha256, located.length):
            return VERIFIED
        index.run_tool_txn(db, index.mark_blob_missing_txn, located.sha256)
    return _store_one(
        db, store, path, ref, local_file, legacy_key, rows, expected_length, copy, notes
    )



# --- gc --------------------------------------------------------------------------------


_PAGE = 10_000
# Keys per DeleteObjects call at most (S3's limit).
_DELETE_BATCH = MAX_KEYS_PER_DELETE


def _unreferenced(page: Any, cutoff: int, after: str = "") -> Iterator[tuple[str, int, int]]:
    """All unreferenced blobs, fetched a page at a time in hash order (bounded memory)."""
    while True:
        rows = page(cutoff, _PAGE, after)
        yield from rows
        if len(rows) < _PAGE:
            return
        after = rows[-1][0]


def _objects_without_row(db: Any, store: Any, after: str = "") -> Iterator[tuple[str, Any]]:
    """Objects in the store that no blob row knows, by merging two hash-ordered lists.

    Both the store listing and the index pages come in hash order, so the sweep holds one
    page of hashes at a time, whatever the number of objects (10^8 hashes as a set
    would need gigabytes).
    """
    page: list[str] = []
    position = 0
    exhausted = False
    for info in store.list_blobs(after) if after else store.list_blobs():
        sha = info.name.rsplit("/", 1)[-1]
        while True:
            if position == len(page) and not exhausted:
                page = index.run_tool_txn(db, index.known_blobs_page_txn, after, _PAGE)
                position = 0
                exhausted = len(page) < _PAGE
                if page:
                    after = page[-1]
            if position < len(page) and page[position] < sha:
                position += 1
                continue
            break
        if position < len(page) and page[position] == sha:
            continue
        yield sha, info


# The dry run's scratch tables: temporary (this connection's own, gone when it closes),
# so that the paths it would remove are deduplicated and joined in the database, not in
# this process's memory.
_DRY_REMOVED = "msc3916_gc_dry_removed"
_DRY_STALE = "msc3916_gc_dry_stale"
_DRY_CANDIDATES = "msc3916_gc_dry_candidates"


def _dry_tables_txn(txn: index.Txn) -> None:
    txn.execute(
        f"CREATE TEMP TABLE {_DRY_REMOVED} (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL)", ()
    )
    txn.execute(
        f"CREATE TEMP TABLE {_DRY_STALE} (token TEXT PRIMARY KEY, sha256 TEXT NOT NULL)", ()
    )
    txn.execute(f"CREATE TEMP TABLE {_DRY_CANDIDATES} (sha256 TEXT PRIMARY KEY)", ())


def _dry_insert_txn(txn: index.Txn, table: str, rows: list[tuple[str, str]]) -> None:
    """Up to 400 rows a statement (800 parameters: below SQLite's oldest limit of 999),
    not one round trip each."""
    key = "path" if table == _DRY_REMOVED else "token"
    for start in range(0, len(rows), 400):
        chunk = rows[start:start + 400]
        txn.execute(
            f"INSERT INTO {table} VALUES {', '.join(['(?, ?)'] * len(chunk))}"
            f" ON CONFLICT ({key}) DO NOTHING",
            [value for row in chunk for value in row],
        )


def _dry_candidates_txn(txn: index.Txn) -> int:
    """Contents the removed paths or released claims may leave unreferenced; the number
    of removed paths."""
    txn.execute(
        f"INSERT INTO {_DRY_CANDIDATES} SELECT sha256 FROM {_DRY_REMOVED}"
        f" UNION SELECT sha256 FROM {_DRY_STALE}",
        (),
    )
    if index.is_postgres(txn):  # temporary tables are never auto-analysed
        for table in (_DRY_REMOVED, _DRY_STALE, _DRY_CANDIDATES):
            txn.execute(f"ANALYZE {table}", ())
    txn.execute(f"SELECT COUNT(*) FROM {_DRY_REMOVED}", ())
    return int(txn.fetchone()[0])


def _dry_due_page_txn(
    txn: index.Txn, stale_deleting: int, limit: int, after: str
) -> list[tuple[str, int, int]]:
    """Candidates whose every path is removed and every claim released, with a blob row
    not being deleted (or deleted by a stale mark), in hash order after ``after``."""
    txn.execute(
        f"SELECT c.sha256, b.length FROM {_DRY_CANDIDATES} c"
        f" JOIN {index.BLOBS} b ON b.sha256 = c.sha256 WHERE c.sha256 > ?"
        " AND (b.deleting_ts IS NULL OR b.deleting_ts < ?)"
        f" AND NOT EXISTS (SELECT 1 FROM {index.PATHS} p WHERE p.sha256 = c.sha256"
        f"  AND NOT EXISTS (SELECT 1 FROM {_DRY_REMOVED} r"
        "   WHERE r.path = p.path AND r.sha256 = p.sha256))"
        f" AND NOT EXISTS (SELECT 1 FROM {index.CLAIMS} k WHERE k.sha256 = c.sha256"
        f"  AND NOT EXISTS (SELECT 1 FROM {_DRY_STALE} s WHERE s.token = k.token))"
        " ORDER BY c.sha256 LIMIT ?",
        (after, stale_deleting, limit),
    )
    return [(str(r[0]), int(r[1]), 0) for r in txn.fetchall()]


def _gc_dry_run(db: Any, now: int, cutoff: int, grace_ms: int, stats: dict[str, Any]) -> None:
    """Count what ``--apply`` would remove, with reads only.

    Every query is its own short transaction (a page at a time), so the dry run takes
    no write lock and holds no snapshot for long: uploads and Synapse's own writes go
    on while it runs. (It used to do the index work in one transaction rolled back at
    the end, which locked the blob rows on PostgreSQL and the whole SQLite database.)
    The paths are those pending tombstones and the orphan sweep would remove; the
    contents those already unreferenced, plus those the removed paths and released
    stale claims would leave unreferenced (their ``delete_after`` would start now, so
    they count only with ``--grace 0``). The removed paths go to a temporary table, not
    to memory (10^6 tombstones made a dict of hundreds of MiB); the contents are
    counted as they stream by, in hash order, and only the first ``EXAMPLES`` listed.
    """
    index.run_tool_txn(db, _dry_tables_txn)
    try:
        _gc_dry_count(db, now, cutoff, grace_ms, stats)
    finally:
        index.run_tool_txn(db, _drop_dry_tables_txn)


def _drop_dry_tables_txn(txn: index.Txn) -> None:
    for table in (_DRY_REMOVED, _DRY_STALE, _DRY_CANDIDATES):
        txn.execute(f"DROP TABLE {table}", ())


def _gc_dry_count(db: Any, now: int, cutoff: int, grace_ms: int, stats: dict[str, Any]) -> None:
    index.run_tool_txn(
        db, _dry_insert_txn, _DRY_STALE, index.run_tool_txn(db, index.stale_claims_txn, now)
    )
    after = 0
    while True:
        after, read, found = index.run_tool_txn(db, index.tombstone_paths_page_txn, after, 1000)
        index.run_tool_txn(db, _dry_insert_txn, _DRY_REMOVED, found)
        if read < 1000:
            break
    last = ""
    while True:
        rows = index.run_tool_txn(db, index.orphan_path_rows_txn, cutoff, 1000, last)
        index.run_tool_txn(db, _dry_insert_txn, _DRY_REMOVED, rows)
        if len(rows) < 1000:
            break
        last = rows[-1][0]
    stats["paths_removed"] += index.run_tool_txn(db, _dry_candidates_txn)
    unreferenced = _unreferenced(
        lambda *a: index.run_tool_txn(db, index.unreferenced_blobs_txn, *a),
        index.now_ms() - grace_ms,
    )
    due: Iterable[tuple[str, int, int]] = unreferenced
    if grace_ms <= 0:
        stale_deleting = now - index.DELETING_STALE_MS
        freed = _unreferenced(
            lambda _cutoff, limit, start: index.run_tool_txn(
                db, _dry_due_page_txn, stale_deleting, limit, start
            ),
            0,
        )
        due = heapq.merge(freed, unreferenced)
    previous = None
    for sha256, length, _gen in due:  # both in hash order: a content in both counts once
        if sha256 == previous:
            continue
        previous = sha256
        stats["objects_deleted"] += 1
        stats["bytes_freed"] += length
        _example(stats, "deleted", sha256)


def _check_after_lost_mark(db: Any, store: Any, sha256: str) -> None:
    """An upload took this deletion's mark over: if the object is gone, say so in the
    index, so that the next store of the content rewrites it (``index.lost_object_txn``)."""
    if object_missing_after_lost_mark(store, sha256):
        index.run_tool_txn(db, index.lost_object_txn, sha256, index.now_ms())


def cmd_gc(args: argparse.Namespace) -> int:
    """Forget paths whose media Synapse deleted, then delete objects nothing references.

    Safe at any ``--grace``: deleted media are known exactly from the tombstones the
    deletion triggers wrote, and an upload in flight holds a claim on its blob until
    its path is recorded. The grace only keeps recent garbage a while, and decides
    about paths the tombstones cannot explain (indexed before the triggers existed),
    which are also never younger than ``UNEXPLAINED_PATH_MIN_AGE_MS``. With the
    provider's ``delete_after`` the deletion job does all this by itself; ``gc`` is
    the safety net (objects nothing indexes, ``delete_after: null``).
    """
    parallel_defaults(args)
    ctx = Context(args.config, args.jobs)
    ctx.store = make_blobstore(gc_storage_config(ctx.storage))
    apply = args.apply and not args.dry_run
    now = index.now_ms()
    cutoff = now - int(args.grace * 1000)
    stats: dict[str, Any] = {
        "paths_removed": 0,
        "objects_deleted": 0,
        "bytes_freed": 0,
        "orphan_objects_deleted": 0,
        "applied": apply,
        "deleted": [],
    }
    timer = Timer()
    with _open(ctx) as db:
        index.run_tool_txn(db, index.ensure_schema_txn)
        if not apply:
            _gc_dry_run(db, now, cutoff, int(args.grace * 1000), stats)
            for _sha, info in _objects_without_row(db, ctx.store):
                if info.mtime * 1000 < cutoff:
                    stats["orphan_objects_deleted"] += 1
                    stats["bytes_freed"] += info.size
        else:
            _gc_apply(ctx, db, args, now, cutoff, stats, timer)
    timer.summary(stats, args, ctx.jobs)
    listed = stats["objects_deleted"] + (stats["orphan_objects_deleted"] if apply else 0)
    stats["deleted_truncated"] = listed > len(stats["deleted"])
    _report("gc", stats, args)
    return 0


def _count_unreferenced_txn(txn: index.Txn, cutoff: int) -> int:
    """How many blobs ``gc`` will consider (the progress bar's total): one COUNT with the
    conditions of ``unreferenced_blobs_txn``."""
    txn.execute(
        f"SELECT COUNT(*) FROM {index.BLOBS} b"
        " WHERE COALESCE(b.unref_ts, b.last_ref_ts) <= ?"
        " AND (b.deleting_ts IS NULL OR b.deleting_ts < ?)"
        f" AND NOT EXISTS (SELECT 1 FROM {index.PATHS} p WHERE p.sha256 = b.sha256)"
        f" AND NOT EXISTS (SELECT 1 FROM {index.CLAIMS} c WHERE c.sha256 = b.sha256)",
        (cutoff, index.now_ms() - index.DELETING_STALE_MS),
    )
    return int(txn.fetchone()[0])


def _chunks(rows: Iterable[Any], size: int, key: Any) -> Iterator[tuple[str, list[Any]]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield key(chunk[-1]), chunk
            chunk = []
    if chunk:
        yield key(chunk[-1]), chunk


def _delete_chunk(
    db: Any, store: Any, chunk: list[tuple[str, int, int | None]]
) -> list[tuple[str, int]]:
    """Delete a chunk of objects (in a worker) as the deletion job deletes a batch, with
    its shared steps (``lifecycle``): mark every row in one transaction, delete the
    marked objects in one ``DeleteObjects`` call, settle the marks (finish or abort) in
    one transaction, check the objects whose mark an upload took over. ``gen`` None: an
    object with no row (the orphan sweep).

    The delete starts only within ``START_DELETE_WITHIN_SECONDS`` of the marking (else
    the marks are released for the next run)."""
    started = time.monotonic()
    marked = index.run_tool_txn(db, mark_batch_txn, chunk, index.now_ms())
    if not marked:
        return []
    kill_point()

    def settle(failed: Any) -> None:
        for sha256 in index.run_tool_txn(db, settle_batch_txn, marked, failed):
            _check_after_lost_mark(db, store, sha256)

    try:
        failed = delete_if_in_time(store, marked, started)
    except StorageUnavailable:
        # Never leave a row claiming an object that may be gone.
        settle({m.sha256 for m in marked})
        raise
    if failed is None:
        # The database stalled that long: a delete now might land after an upload took
        # a mark over. Left for the next run.
        index.run_tool_txn(db, unmark_batch_txn, marked)
        return []
    kill_point()
    settle(failed)
    if failed:
        sha256, why = next(iter(failed.items()))
        raise StorageUnavailable(f"{len(failed)} object(s) could not be deleted ({sha256}: {why})")
    return [(m.sha256, m.length) for m in marked]


def _gc_apply(
    ctx: Context,
    db: Any,
    args: argparse.Namespace,
    now: int,
    cutoff: int,
    stats: dict[str, Any],
    timer: Timer,
) -> None:
    """``gc --apply``: paths first (tombstones, orphans; both resumable by nature, what is
    done is gone), then unreferenced blobs and objects without a row, in hash order,
    ``--jobs`` chunks of up to 1,000 at once, with the run's cursor in the database."""
    run = ToolRun(ctx.config, db, "gc", f"grace={args.grace}", args.restart)
    limiter = RateLimiter(args.max_rate)
    with Connections(ctx.config) as conns, run.active() as resume:
        _resumed("gc", resume, stats)
        index.run_tool_txn(db, index.release_stale_claims_txn, now)
        while True:
            batch = index.run_tool_txn(
                db, index.apply_tombstones_txn, index.now_ms(), TOMBSTONE_BATCH
            )
            stats["paths_removed"] += batch.paths_removed
            if batch.tombstones < TOMBSTONE_BATCH:
                break
        while True:
            paths = index.run_tool_txn(db, index.orphan_paths_txn, cutoff, 1000)
            removed = 0
            for path in paths:
                removed += int(index.run_tool_txn(db, index.delete_path_txn, path, cutoff))
            stats["paths_removed"] += removed
            if len(paths) < 1000 or not removed:
                break
        phase, after = (resume.cursor or "u:").split(":", 1)
        unref_cutoff = index.now_ms() - int(args.grace * 1000)
        total = 0
        if phase == "u":
            total = index.run_tool_txn(db, _count_unreferenced_txn, unref_cutoff)
        progress = Progress("gc", total, unit="object")
        # Chunks big enough for few DeleteObjects calls, small enough to keep every
        # worker busy.
        size = max(1, min(_DELETE_BATCH, -(-total // ctx.jobs) if total else _DELETE_BATCH))

        def work(chunk: list[tuple[str, int, int | None]]) -> list[tuple[str, int]]:
            return _delete_chunk(conns.get(), ctx.store, chunk)

        def done_as(counter: str) -> Any:
            def done(chunk: list[Any], marked: list[tuple[str, int]]) -> None:
                progress.update(len(chunk))
                timer.count += len(chunk)
                for sha256, length in marked:
                    stats[counter] += 1
                    stats["bytes_freed"] += length
                    _example(stats, "deleted", sha256)
            return done

        def checkpoint_as(p: str) -> Any:
            return lambda key: run.checkpoint(f"{p}:{key}", timer.count, _counters(stats))

        try:
            if phase == "u":
                candidates = _unreferenced(
                    lambda *a: index.run_tool_txn(db, index.unreferenced_blobs_txn, *a),
                    unref_cutoff,
                    after,
                )
                run_ordered(
                    _chunks(candidates, size, lambda row: row[0]), work, ctx.jobs, limiter,
                    done_as("objects_deleted"), checkpoint_as("u"), cost=len,
                )
                after = ""
            orphans = (
                (sha, info.size, None)
                for sha, info in _objects_without_row(db, ctx.store, after)
                if info.mtime * 1000 < cutoff
            )
            run_ordered(
                _chunks(orphans, size, lambda row: row[0]), work, ctx.jobs, limiter,
                done_as("orphan_objects_deleted"), checkpoint_as("o"), cost=len,
            )
        except StorageUnavailable as e:
            raise hc.ToolError(str(e)) from None
        finally:
            progress.close()
    run.finish(None if not timer.count else timer.count / max(time.monotonic() - timer.start, 1e-6))


# --- stats -------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    ctx = Context(args.config)
    with _open(ctx) as db:
        index.run_tool_txn(db, index.ensure_schema_txn)
        stats = index.run_tool_txn(db, index.stats_txn, args.top)
    stats["store"] = ctx.store.describe()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    print(f"store:           {stats['store']}")
    print(f"paths:           {stats['paths']}")
    print(f"objects:         {stats['objects']} ({stats['corrupt_objects']} corrupt)")
    print(f"logical bytes:   {_human(stats['logical_bytes'])}")
    print(f"stored bytes:    {_human(stats['stored_bytes'])}")
    print(f"saved bytes:     {_human(stats['saved_bytes'])}")
    print(f"dedup ratio:     {stats['dedup_ratio']}")
    if stats["duplicates_skipped"]:
        print(
            f"largest duplicates: not listed above {index.DUPLICATES_SCAN_MAX_PATHS:,} paths"
            " (a scan of the whole index); ask with --top N"
        )
    if stats["largest_duplicates"]:
        print("largest duplicates:")
        for dup in stats["largest_duplicates"]:
            print(
                f"  {dup['sha256'][:16]}…  {dup['paths']} paths x {_human(dup['length'])}"
                f"  saves {_human(dup['saved'])}"
            )
    return 0


def _report(command: str, stats: dict[str, Any], args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        print(json.dumps(stats, indent=2, sort_keys=True))
        return
    mode = (
        " (dry run: nothing changed)"
        if getattr(args, "dry_run", False) or (command == "gc" and not stats.get("applied"))
        else ""
    )
    print(f"{command}{mode}:")
    for key, value in stats.items():
        if key in ("deleted", "deleted_truncated", "applied"):
            continue
        print(f"  {key}: {_human(value) if key.startswith('bytes') else value}")


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """``--jobs``, ``--max-rate`` and ``--restart``, shared by migrate, gc and scrub."""
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="objects worked on at once (default: 16 for S3, 4 for a directory)",
    )
    p.add_argument(
        "--max-rate",
        type=float,
        default=None,
        metavar="OBJECTS_PER_S",
        help="at most this many objects a second over all workers (default: no limit)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start from the beginning instead of resuming an interrupted run",
    )


def parallel_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in ``--jobs``/``--max-rate``/``--restart`` (and ``migrate``'s
    ``--no-server-side-copy``) for callers that build the namespace themselves (tests,
    scripts) without them."""
    for name, value in (
        ("jobs", None), ("max_rate", None), ("restart", False), ("no_server_side_copy", False)
    ):
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def register(subparsers: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", required=True, help="Synapse's homeserver.yaml")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        add_parallel_arguments(p)

    p = subparsers.add_parser(
        "migrate", help="load the local media store or a synapse-s3-storage-provider prefix"
    )
    common(p)
    p.add_argument(
        "--from-legacy-prefix",
        nargs="?",
        const=True,
        default=None,
        metavar="PREFIX",
        help="migrate objects written by synapse-s3-storage-provider under PREFIX"
        " (default: the configured legacy_prefix) instead of the local media store",
    )
    p.add_argument("--keep-source", action="store_true", help="do not delete legacy objects")
    p.add_argument(
        "--no-server-side-copy",
        action="store_true",
        help="download and upload every legacy object, even where S3 CopyObject could"
        " copy it inside the bucket (the default when Synapse recorded its SHA-256)",
    )
    p.add_argument(
        "--min-age",
        type=parse_duration,
        default=parse_duration("1h"),
        help="local media store: skip files modified more recently than this, which"
        " Synapse may still be writing (default 1h)",
    )
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    p.set_defaults(func=cmd_migrate)

    p = subparsers.add_parser("gc", help="delete index rows and objects Synapse no longer uses")
    common(p)
    p.add_argument(
        "--grace",
        type=parse_duration,
        default=parse_duration("24h"),
        help="never touch anything newer than this (default 24h)",
    )
    p.add_argument("--apply", action="store_true", help="really delete (default: dry run)")
    p.add_argument("--dry-run", action="store_true", help="report, change nothing (default)")
    p.set_defaults(func=cmd_gc)

    p = subparsers.add_parser("stats", help="objects, logical vs stored bytes, dedup ratio")
    p.add_argument("-c", "--config", required=True, help="Synapse's homeserver.yaml")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--top",
        type=int,
        default=None,
        help="how many largest duplicates to list (default: 10, none above"
        f" {index.DUPLICATES_SCAN_MAX_PATHS:,} paths: the list scans the whole index)",
    )
    p.set_defaults(func=cmd_stats)


__all__ = ["register"]
