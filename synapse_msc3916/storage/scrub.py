"""``synapse-msc3916 scrub``: check that every indexed object is really in the store.

The index is the provider's memory of what the store holds; nothing else notices when
the two drift apart (an object deleted by an operator or a bucket lifecycle rule, a
truncated file, bit rot) until a user's download fails. ``scrub`` walks every blob row
that says "stored" and checks its object: that it exists with the recorded size, and
with ``--hash`` that its SHA-256 is its name. ``--repair`` re-stores a broken object from
a copy in Synapse's local media store when one exists (its hash verified first, the
rewritten object verified after), and otherwise marks it, so that the next upload of
the same content rewrites it (see ``index.mark_blob_missing_txn``).

Exit code 0 when everything is sound (or was repaired), 1 when something is still
broken, so that a cron job or a monitoring check can alert on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import attr

from synapse_msc3916 import homeserver_config as hc
from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import StorageUnavailable, hash_blob, make_blobstore
from synapse_msc3916.storage.parallel import Connections, RateLimiter, kill_point, run_ordered
from synapse_msc3916.storage.progress import Progress
from synapse_msc3916.storage.provider import hash_file
from synapse_msc3916.storage.runs import ToolRun
from synapse_msc3916.storage.tools import (
    EXAMPLES,
    Context,
    Timer,
    _counters,
    _example,
    _resumed,
    add_parallel_arguments,
    parallel_defaults,
)

OK, MISSING, CORRUPT = "ok", "missing", "corrupt"
# Paths pointing at content with no blob row at all (a deletion that lost a race with an
# upload): reads of them fail although the object may be there.
UNRECORDED = "unrecorded"
# Paths pointing at a blob row that says "not stored": reads of them fail although the
# object may be there (what a deletion that lost its mark to an upload left before
# issue 18, or a store that failed after its path was recorded).
UNSTORED = "unstored"
_PAGE = 1000
# The walk's phases, in order (the cursor is "<phase>:<sha256>"): stored blob rows,
# contents paths use without a row, contents whose row says "not stored".
_PHASES = "bus"


def _stored_blobs_page_txn(
    txn: index.Txn, after: str, limit: int
) -> list[tuple[str, int, bool]]:
    """Blob rows that claim a stored object (and are not being deleted), in hash order."""
    txn.execute(
        f"SELECT sha256, length, corrupt FROM {index.BLOBS}"
        " WHERE sha256 > ? AND stored = 1 AND deleting_ts IS NULL ORDER BY sha256 LIMIT ?",
        (after, limit),
    )
    return [(str(r[0]), int(r[1]), bool(r[2])) for r in txn.fetchall()]


def _unrecorded_page_txn(
    txn: index.Txn, after: str, limit: int
) -> list[tuple[str, int, bool]]:
    """Contents that paths reference but no blob row records, in hash order."""
    txn.execute(
        f"SELECT p.sha256, MAX(p.length) FROM {index.PATHS} p"
        f" WHERE p.sha256 > ? AND NOT EXISTS"
        f" (SELECT 1 FROM {index.BLOBS} b WHERE b.sha256 = p.sha256)"
        " GROUP BY p.sha256 ORDER BY p.sha256 LIMIT ?",
        (after, limit),
    )
    return [(str(r[0]), int(r[1]), False) for r in txn.fetchall()]


def _unstored_page_txn(
    txn: index.Txn, after: str, limit: int
) -> list[tuple[str, int, bool]]:
    """Blob rows that paths reference but that say "not stored", in hash order."""
    txn.execute(
        f"SELECT b.sha256, b.length FROM {index.BLOBS} b"
        " WHERE b.sha256 > ? AND b.stored = 0 AND b.deleting_ts IS NULL AND EXISTS"
        f" (SELECT 1 FROM {index.PATHS} p WHERE p.sha256 = b.sha256)"
        " ORDER BY b.sha256 LIMIT ?",
        (after, limit),
    )
    return [(str(r[0]), int(r[1]), False) for r in txn.fetchall()]


def _count_stored_txn(txn: index.Txn) -> int:
    txn.execute(
        f"SELECT COUNT(*) FROM {index.BLOBS} WHERE stored = 1 AND deleting_ts IS NULL", ()
    )
    return int(txn.fetchone()[0])


def _paths_of_txn(txn: index.Txn, sha256: str) -> list[str]:
    txn.execute(f"SELECT path FROM {index.PATHS} WHERE sha256 = ? ORDER BY path", (sha256,))
    return [str(r[0]) for r in txn.fetchall()]


# Paths a problem lists at most: popular content can have many thousands.
_PATHS_LISTED = 10


def _some_paths_txn(txn: index.Txn, sha256: str) -> list[str]:
    txn.execute(
        f"SELECT path FROM {index.PATHS} WHERE sha256 = ? ORDER BY path LIMIT ?",
        (sha256, _PATHS_LISTED),
    )
    return [str(r[0]) for r in txn.fetchall()]


def check_object(store: Any, sha256: str, length: int, content: bool) -> tuple[str, str]:
    """(``ok``/``missing``/``corrupt``, why) for one object; store errors raise."""
    if content:
        read = hash_blob(store, sha256)
        if read is None:
            return MISSING, "no object"
        if read != (sha256, length):
            return CORRUPT, f"reads back as {read[1]} bytes with SHA-256 {read[0]}"
        return OK, ""
    size = store.stat(sha256)
    if size is None:
        return MISSING, "no object"
    if size != length:
        return CORRUPT, f"{size} bytes, the index says {length}"
    return OK, ""


def _rows(db: Any, page_txn: Any, after: str = "") -> Iterator[tuple[str, int, bool]]:
    while True:
        rows = index.run_tool_txn(db, page_txn, after, _PAGE)
        yield from rows
        if len(rows) < _PAGE:
            return
        after = rows[-1][0]


def _record_existing(db: Any, store: Any, sha256: str, length: int) -> str | None:
    """Give content whose object is sound but which has no blob row (or one that says
    "not stored") its row back."""
    paths = index.run_tool_txn(db, _paths_of_txn, sha256)
    ref = index.parse_media_path(paths[0]) if paths else None
    if ref is None:
        return None
    decision, _overwrite = index.run_tool_txn(
        db, index.claim_blob_txn, sha256, length, index.now_ms()
    )
    if decision == index.WAIT or hash_blob(store, sha256) != (sha256, length):
        return None
    index.run_tool_txn(
        db, index.record_path_txn, paths[0], sha256, length, ref, index.now_ms(), True
    )
    return paths[0]


def repair(db: Any, store: Any, media_store: str, sha256: str, length: int) -> str | None:
    """Re-store a broken object from a verified local copy; the path used, or None.

    Follows the upload protocol: the row is marked (so that a claim answers ``write``
    with overwrite) and claimed (so that a concurrent gc leaves it alone), the copy's
    hash is checked before the write and the object's after it.
    """
    for path in index.run_tool_txn(db, _paths_of_txn, sha256):
        local = os.path.join(media_store, path)
        try:
            if os.path.getsize(local) != length or hash_file(local) != (sha256, length):
                continue
        except OSError:
            continue
        index.run_tool_txn(db, index.mark_blob_missing_txn, sha256)
        decision, _overwrite = index.run_tool_txn(
            db, index.claim_blob_txn, sha256, length, index.now_ms()
        )
        if decision == index.WAIT:
            return None  # a gc is deleting it: nothing references it any more
        kill_point()
        store.put_file(sha256, local, length, True)
        kill_point()
        if hash_blob(store, sha256) != (sha256, length):
            return None
        ref = index.parse_media_path(path)
        if ref is None:
            return None
        index.run_tool_txn(
            db, index.record_path_txn, path, sha256, length, ref, index.now_ms(), True
        )
        return path
    return None


# sha256, length, marked corrupt (None: no blob row; UNSTORED: a row saying "not stored")
Row = tuple[str, int, "bool | str | None"]


def _scrub_one(
    db: Any, store: Any, media_store: str, row: Row, args: argparse.Namespace
) -> tuple[str, dict[str, Any] | None]:
    """Check (and with ``--repair`` mend) one object, in a worker thread."""
    sha256, length, marked = row
    state, why = check_object(store, sha256, length, args.hash)
    if state == OK and marked == UNSTORED:
        state, why = UNSTORED, "paths use it but the index says it is not stored"
    elif state == OK and marked is True:
        # The object looks sound but a read found it damaged: trust the read.
        state, why = CORRUPT, "marked damaged by an earlier read"
    elif state == OK and marked is None:
        state, why = UNRECORDED, "paths use it but the index has no blob row"
    if state == OK:
        return OK, None
    entry: dict[str, Any] = {"sha256": sha256, "problem": state, "detail": why}
    entry["paths"] = index.run_tool_txn(db, _some_paths_txn, sha256)
    if args.repair:
        if state in (UNRECORDED, UNSTORED):
            used = _record_existing(db, store, sha256, length)
        else:
            used = repair(db, store, media_store, sha256, length)
        entry["repaired_from"] = used
        if used is None:
            entry["marked"] = bool(index.run_tool_txn(db, index.mark_blob_missing_txn, sha256))
    return state, entry


def cmd_scrub(args: argparse.Namespace) -> int:
    """Every blob row that says "stored", then every content paths use without a row,
    then every content paths use whose row says "not stored", each in hash order,
    ``--jobs`` objects at once; resumable from the cursor kept in the database (a run
    with other options starts over)."""
    parallel_defaults(args)
    ctx = Context(args.config, args.jobs)
    if (
        args.hash
        and not args.repair
        and ctx.storage.backend == "s3"
        and ctx.storage.response_checksum_validation is None
    ):
        # Every byte's SHA-256 is checked, so botocore's CRC32 of each response adds
        # nothing but CPU (a fifth of --hash's throughput on B5's two cores); a
        # transport error then reads as a mismatch, which a run without --repair only
        # reports. --repair keeps the CRC: it acts on what it reads.
        ctx.store = make_blobstore(
            attr.evolve(ctx.storage, response_checksum_validation="when_required")
        )
    stats: dict[str, Any] = {
        "checked": 0,
        "ok": 0,
        "missing": 0,
        "corrupt": 0,
        "unrecorded": 0,
        "unstored": 0,
        "repaired": 0,
        "marked": 0,
        "broken": [],
        "broken_truncated": False,
        "hash": bool(args.hash),
        "repair": bool(args.repair),
    }
    limiter = RateLimiter(args.max_rate)
    timer = Timer()
    options = " ".join(o for o, on in (("--hash", args.hash), ("--repair", args.repair)) if on)
    with hc.open_database(ctx.config) as db:
        index.run_tool_txn(db, index.ensure_schema_txn)
        run = ToolRun(ctx.config, db, "scrub", options or "sizes", args.restart)
        with Connections(ctx.config) as conns, run.active() as resume:
            _resumed("scrub", resume, stats)
            _earlier_problems(stats, args)
            total = index.run_tool_txn(db, _count_stored_txn)
            bar = Progress("scrub", total, unit="object", initial=resume.done)
            phase, after = (resume.cursor or "b:").split(":", 1)

            def rows(p: str) -> Iterator[tuple[str, Row]]:
                start = after if p == phase else ""
                if p == "b":
                    for sha, n, corrupt in _rows(db, _stored_blobs_page_txn, start):
                        yield f"b:{sha}", (sha, n, corrupt)
                elif p == "u":
                    for sha, n, _ in _rows(db, _unrecorded_page_txn, start):
                        yield f"u:{sha}", (sha, n, None)
                else:
                    for sha, n, _ in _rows(db, _unstored_page_txn, start):
                        yield f"s:{sha}", (sha, n, UNSTORED)

            def done(_row: Row, result: tuple[str, dict[str, Any] | None]) -> None:
                state, entry = result
                bar.step()
                timer.count += 1
                stats["checked"] += 1
                stats[state] += 1
                if entry is None:
                    return
                if "repaired_from" in entry:
                    if entry["repaired_from"] is not None:
                        stats["repaired"] += 1
                    else:
                        stats["marked"] += int(entry.pop("marked"))
                # Printed now, kept only as one of the first examples: a store that lost
                # most of its objects has as many problems as objects.
                _print_problem(entry, args)
                _example(stats, "broken", entry)

            try:
                # One phase after the other, each drained before the next reads its rows:
                # a repair in flight leaves a row "not stored" for a moment, which the
                # unstored phase, read ahead, would count a second time.
                for p in _PHASES[_PHASES.index(phase):]:
                    run_ordered(
                        rows(p),
                        lambda row: _scrub_one(conns.get(), ctx.store, ctx.media_store, row, args),
                        ctx.jobs,
                        limiter,
                        done,
                        lambda key: run.checkpoint(key, resume.done + timer.count, _counters(stats)),
                    )
            except StorageUnavailable as e:
                raise hc.ToolError(str(e)) from None
            finally:
                bar.close()
        run.finish(timer.summary(stats, args, ctx.jobs))
    still_broken = (
        stats["missing"] + stats["corrupt"] + stats["unrecorded"] + stats["unstored"]
        - stats["repaired"]
    )
    stats["still_broken"] = still_broken
    stats["broken_truncated"] = _problems(stats) > len(stats["broken"])
    _print(stats, args)
    return 1 if still_broken else 0


def _problems(stats: dict[str, Any]) -> int:
    return int(stats["missing"] + stats["corrupt"] + stats["unrecorded"] + stats["unstored"])


def _print_problem(entry: dict[str, Any], args: argparse.Namespace, before: str = "") -> None:
    """One problem as found: on stdout, or on stderr with ``--json`` (whose stdout is the
    one JSON document), through tqdm so that the progress bar is not torn."""
    line = f"{entry['problem']}: {entry['sha256']} ({entry['detail']})"
    if "repaired_from" in entry:
        fixed = entry["repaired_from"]
        line += f": repaired from {fixed}" if fixed else ": no local copy, marked for rewrite"
    lines = [line + before] + [f"    {path}" for path in entry["paths"][:5]]
    Progress.write("\n".join(lines), file=sys.stderr if args.json else sys.stdout)


def _earlier_problems(stats: dict[str, Any], args: argparse.Namespace) -> None:
    """A resumed run lists again what the interrupted run(s) found (their first
    ``EXAMPLES``, kept with the cursor): its counts include them."""
    for entry in stats["broken"]:
        _print_problem(entry, args, " (found before the resume)")
    more = _problems(stats) - len(stats["broken"])
    if more > 0:
        Progress.write(
            f"scrub: {more} more problem(s) found before the resume are counted, not listed"
            f" (only the first {EXAMPLES} are kept)",
            file=sys.stderr if args.json else sys.stdout,
        )


def _print(stats: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return
    print(
        f"scrub: {stats['checked']} checked, {stats['ok']} ok, {stats['missing']} missing,"
        f" {stats['corrupt']} corrupt, {stats['unrecorded']} unrecorded,"
        f" {stats['unstored']} unstored,"
        f" {stats['repaired']} repaired"
        + (" (content hashed)" if stats["hash"] else " (sizes only; --hash reads content)")
    )
    if stats["still_broken"]:
        print(f"scrub: {stats['still_broken']} object(s) still broken", file=sys.stderr)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "scrub", help="check that every indexed object exists with its size (and content)"
    )
    p.add_argument("-c", "--config", required=True, help="Synapse's homeserver.yaml")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_parallel_arguments(p)
    p.add_argument("--hash", action="store_true", help="read every object and check its SHA-256")
    p.add_argument(
        "--repair",
        action="store_true",
        help="re-store broken objects from the local media store when a verified copy"
        " exists, and mark the others so that the next upload rewrites them",
    )
    p.set_defaults(func=cmd_scrub)


__all__ = ["register", "check_object"]
