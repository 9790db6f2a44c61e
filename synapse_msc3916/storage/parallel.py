"""Running a tool's per-object work on N threads: ``--jobs``, ``--max-rate``, a cursor.

An S3 request costs a round trip (about 20 ms to a real region), so one object at a
time caps a tool at a few dozen objects a second whatever the bucket could do; the
tools therefore hand objects to a pool of worker threads. Each worker does a whole
object (read, hash, claim, write, record...) with its own database connection
(sqlite3 connections belong to the thread that opened them, and a PostgreSQL
connection is one transaction at a time), so every per-object step keeps the exact
claim/mark protocol of the one-at-a-time code.

The coordinating thread reads the work in key order (keyset pages, never a whole table)
and collects results in that same order. That is what makes a run resumable: once every
object up to key K is done, K is a cursor a restarted run can start after
(``runs.ToolRun``); objects after K that were done too are simply looked at again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from synapse_msc3916 import homeserver_config as hc

T = TypeVar("T")
R = TypeVar("R")

# Workers by backend when ``--jobs`` is not given: S3 requests mostly wait on the
# network, so many overlap well; a local directory is limited by the disk and the GIL.
DEFAULT_JOBS = {"s3": 16, "file": 4}
# Objects in flight per worker: enough that a worker never waits for the coordinator.
_IN_FLIGHT_PER_JOB = 4
# Seconds between two cursor commits (and at the end): what a killed run redoes. The
# environment variable exists for tests, which kill runs shorter than that.
CHECKPOINT_SECONDS = float(os.environ.get("MSC3916_CHECKPOINT_SECONDS", "2") or 2)

# Test hook, never set in production: ``MSC3916_TEST_KILL_AT=k`` makes the process
# SIGKILL itself at the k-th ``kill_point()`` (several per object, between the steps
# whose interruption matters), so that tests can kill a tool at a chosen moment.
_KILL_AT = int(os.environ.get("MSC3916_TEST_KILL_AT", "0") or 0)
_kill_count = 0
_kill_lock = threading.Lock()


def kill_point() -> None:
    global _kill_count
    if not _KILL_AT:
        return
    with _kill_lock:
        _kill_count += 1
        if _kill_count >= _KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def default_jobs(backend: str) -> int:
    return DEFAULT_JOBS.get(backend, 4)


class RateLimiter:
    """``--max-rate``: at most ``rate`` objects a second over all workers.

    A token bucket holding a single token (strict pacing): object n may start no sooner
    than n / rate seconds after the first, so a burst never exceeds the rate either.
    ``None`` means no limit.
    """

    def __init__(self, rate: float | None):
        self.rate = rate
        self._lock = threading.Lock()
        self._next = 0.0

    def acquire(self, n: int = 1) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
        if start > now:
            time.sleep(start - now)


class _SerialConnection:
    """A sqlite3 connection whose transactions hold a lock shared by the tool's workers.

    SQLite has one writer at a time anyway, and its busy handler waits by sleeping (up to
    100 ms a try), which with 16 workers cost more than the work itself; a lock hands
    the database from one worker to the next at once. From the first cursor of a
    transaction to its commit or rollback (``index.run_tool_txn``)."""

    def __init__(self, conn: Any, lock: threading.Lock):
        self._conn = conn
        self._lock = lock
        self._held = False

    def cursor(self) -> Any:
        if not self._held:
            self._lock.acquire()
            self._held = True
        return self._conn.cursor()

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def commit(self) -> None:
        try:
            self._conn.commit()
        finally:
            self._release()

    def rollback(self) -> None:
        try:
            self._conn.rollback()
        finally:
            self._release()

    def close(self) -> None:
        self._release()
        self._conn.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class Connections:
    """One database connection per worker thread, opened on first use, closed at the end."""

    def __init__(self, config: dict[str, Any]):
        self._config = config
        self._local = threading.local()
        self._all: list[hc.Database] = []
        self._lock = threading.Lock()
        self._sqlite_lock = threading.Lock()

    def get(self) -> hc.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = hc.connect(self._config)
            if db.engine == "sqlite":
                db.conn = _SerialConnection(db.conn, self._sqlite_lock)
            with self._lock:
                self._all.append(db)
        return db

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                try:
                    db.close()
                except Exception:
                    pass
            self._all.clear()

    def __enter__(self) -> Connections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_ordered(
    items: Iterable[tuple[str, T]],
    work: Callable[[T], R],
    jobs: int,
    limiter: RateLimiter,
    done: Callable[[T, R], None],
    checkpoint: Callable[[str], None],
    cost: Callable[[T], int] = lambda _item: 1,
) -> None:
    """``work(item)`` on ``jobs`` threads; ``done(item, result)`` in the coordinating
    thread, in the items' order; ``checkpoint(key)`` every few seconds with the key of
    the last item such that it and every item before it are done.

    An exception from ``work`` is raised here after checkpointing what is done before
    it; queued items are cancelled, running ones finish.
    """
    pending: deque[tuple[str, T, Future[R]]] = deque()
    last_key: str | None = None
    checkpointed: str | None = None
    last_time = time.monotonic()

    def task(item: T) -> R:
        limiter.acquire(cost(item))
        return work(item)

    def collect(block: bool) -> None:
        nonlocal last_key, checkpointed, last_time
        while pending and (block or pending[0][2].done()):
            key, item, future = pending.popleft()
            done(item, future.result())
            last_key = key
            if time.monotonic() - last_time >= CHECKPOINT_SECONDS:
                checkpoint(key)
                checkpointed, last_time = key, time.monotonic()
            block = False

    window = max(1, jobs) * _IN_FLIGHT_PER_JOB
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="msc3916-tool") as pool:
        try:
            for key, item in items:
                pending.append((key, item, pool.submit(task, item)))
                collect(block=len(pending) >= window)
            while pending:
                collect(block=True)
        except BaseException:
            for _key, _item, future in pending:
                future.cancel()
            if last_key is not None and last_key != checkpointed:
                try:
                    checkpoint(last_key)
                except Exception:
                    pass  # the first error is the one to report
            raise
    if last_key is not None and last_key != checkpointed:
        checkpoint(last_key)


__all__ = ["Connections", "RateLimiter", "default_jobs", "kill_point", "run_ordered"]
