"""One run at a time per tool, and where a killed run stopped: ``msc3916_storage_tool_runs``.

The progress of ``migrate``, ``scrub`` and ``gc --apply`` is kept in Synapse's database,
not in a local file, so that it survives the machine and is seen by whoever runs the
tool next, from wherever. Each tool has one row: its ``owner`` (host:pid:token), a
``heartbeat_ts`` a background thread refreshes every ``HEARTBEAT_SECONDS``, and its
``cursor`` (every object up to it is done; ``parallel.run_ordered``) with the counters
so far.

A second run of the same tool while the first is alive **refuses**, naming the other
run; joining it would need a shared work queue for no real gain (one run already uses
``--jobs`` workers). A run is taken over when its owner is known dead: same host and
its pid no longer exists, or its heartbeat is older than ``STALE_SECONDS`` (another
host, a frozen machine). A run that was stopped (SIGKILL, an S3 outage, a DB restart)
leaves its cursor; the next run with the same arguments resumes after it, one with
other arguments (``scrub`` then ``scrub --hash``) starts from the beginning.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attr

from synapse_msc3916 import homeserver_config as hc
from synapse_msc3916.storage import index

HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Resume:
    """Where this run starts: after ``cursor`` (None: the beginning), with the counters
    of the interrupted run(s) so far, and the rate of the last finished run."""

    cursor: str | None
    done: int
    stats: dict[str, Any] | None
    last_rate: float | None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _row_txn(txn: index.Txn, tool: str) -> Any:
    txn.execute(
        f"SELECT args, owner, cursor, done, stats, started_ts, heartbeat_ts, finished_ts, rate"
        f" FROM {index.TOOL_RUNS} WHERE tool = ?",
        (tool,),
    )
    return txn.fetchone()


def last_rate(db: Any, tool: str) -> float | None:
    """objects/s of the last finished run of ``tool`` (for a dry run's time estimate)."""
    row = index.run_tool_txn(db, _row_txn, tool)
    return None if row is None or row[8] is None else float(row[8])


class ToolRun:
    """The row of one tool, owned by this process from ``start`` to ``finish``/``stop``."""

    def __init__(self, config: dict[str, Any], db: Any, tool: str, args: str, restart: bool):
        self._config = config
        self._db = db
        self.tool = tool
        self.args = args
        self.restart = restart
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _busy_message(self, owner: str, started: int, heartbeat: int, now: int) -> str:
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        return (
            f"another {self.tool} run is in progress (host {host}, pid {pid}, started"
            f" {(now - started) / 1000:.0f} s ago, last heartbeat"
            f" {(now - heartbeat) / 1000:.0f} s ago); wait for it to finish or stop it."
            f" A run whose process is gone is taken over at once on the same host, and"
            f" from another host once its heartbeat is older than {STALE_SECONDS:.0f} s"
        )

    def _start_txn(self, txn: index.Txn, now: int) -> Resume | str:
        # Two runs starting at once: the first to take the write lock decides.
        if index.is_postgres(txn):
            txn.execute(f"LOCK TABLE {index.TOOL_RUNS} IN SHARE ROW EXCLUSIVE MODE", ())
        else:
            txn.execute(f"UPDATE {index.TOOL_RUNS} SET tool = tool WHERE tool = ?", (self.tool,))
        row = _row_txn(txn, self.tool)
        if row is None:
            txn.execute(
                f"INSERT INTO {index.TOOL_RUNS} (tool, args, owner, started_ts, heartbeat_ts)"
                " VALUES (?, ?, ?, ?, ?)",
                (self.tool, self.args, self.owner, now, now),
            )
            return Resume(None, 0, None, None)
        args, owner, cursor, done, stats, started, heartbeat, finished, rate = row
        if owner and finished is None:
            host, _, rest = str(owner).partition(":")
            pid = int(rest.partition(":")[0] or 0)
            dead = host == socket.gethostname() and not _pid_alive(pid)
            if not dead and now - int(heartbeat) < STALE_SECONDS * 1000:
                return self._busy_message(str(owner), int(started), int(heartbeat), now)
        resume = finished is None and args == self.args and not self.restart and cursor
        txn.execute(
            f"UPDATE {index.TOOL_RUNS} SET owner = ?, heartbeat_ts = ?, finished_ts = NULL"
            + ("" if resume else ", args = ?, cursor = NULL, done = 0, stats = NULL, started_ts = ?")
            + " WHERE tool = ?",
            (self.owner, now, self.tool) if resume else (self.owner, now, self.args, now, self.tool),
        )
        last = None if rate is None else float(rate)
        if resume:
            return Resume(str(cursor), int(done), json.loads(stats) if stats else None, last)
        return Resume(None, 0, None, last)

    def start(self) -> Resume:
        """Own the tool's row (or raise ``ToolError`` naming the live run that owns it)."""
        result = index.run_tool_txn(self._db, self._start_txn, index.now_ms())
        if isinstance(result, str):
            raise hc.ToolError(result)
        self._thread = threading.Thread(target=self._beat, name="msc3916-heartbeat", daemon=True)
        self._thread.start()
        return result

    def _beat(self) -> None:
        db = hc.connect(self._config)
        try:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                if not self._touch(db, {}):
                    self.lost = True
                    return
        except Exception:
            pass  # the coordinator's own writes report a database that went away
        finally:
            db.close()

    def _touch(self, db: Any, fields: dict[str, Any]) -> bool:
        sets = "".join(f", {name} = ?" for name in fields)

        def txn_func(txn: index.Txn) -> bool:
            txn.execute(
                f"UPDATE {index.TOOL_RUNS} SET heartbeat_ts = ?{sets}"
                " WHERE tool = ? AND owner = ?",
                (index.now_ms(), *fields.values(), self.tool, self.owner),
            )
            return txn.rowcount == 1

        return bool(index.run_tool_txn(db, txn_func))

    @contextmanager
    def active(self) -> Iterator[Resume]:
        """Own the row for the ``with`` body; an error or a kill signal in it leaves the
        cursor for the next run (``stop``). A body that ends normally is not finished
        yet: ``finish`` it with its rate once its summary is made."""
        resume = self.start()
        try:
            yield resume
        except BaseException:
            self.stop()
            raise

    def checkpoint(self, cursor: str, done: int, stats: dict[str, Any]) -> None:
        """Every object up to ``cursor`` is done: a restart goes on after it."""
        if self.lost or not self._touch(
            self._db, {"cursor": cursor, "done": done, "stats": json.dumps(stats)}
        ):
            self.lost = True
            raise hc.ToolError(
                f"this {self.tool} run was taken over by another one (its heartbeat looked"
                " stale); stopping"
            )

    def finish(self, rate: float | None) -> None:
        """Done: the next run starts from the beginning."""
        self._halt()
        self._touch(
            self._db,
            {"finished_ts": index.now_ms(), "cursor": None, "owner": "", "rate": rate},
        )

    def stop(self) -> None:
        """Stopped by an error: keep the cursor for the next run, release the row."""
        self._halt()
        try:
            self._touch(self._db, {"owner": ""})
        except Exception:
            pass  # the database itself failed; the dead pid or the stale heartbeat frees it

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
