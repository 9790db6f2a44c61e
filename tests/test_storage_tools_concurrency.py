"""The tools run beside a live Synapse: they must not stall its writes nor undo them.

Each test runs a tool in this process against a real Synapse's database and media store,
and forces the interleaving it is about by pausing the tool at a known point (a
wrapped function waits on an event), never by sleeping.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from synapse_msc3916 import homeserver_config as hc
from synapse_msc3916.storage import index, tools
from tests.harness import Synapse, request
from tests.storage_helpers import provider_entry, sha

PAUSE_LIMIT = 120.0  # only bounds a broken test; the events decide the order


class Paused:
    """Runs ``func`` in a thread; ``hold`` makes a wrapped call wait until ``release``."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go_on = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def hold(self) -> None:
        if not self.reached.is_set():
            self.reached.set()
            assert self.go_on.wait(PAUSE_LIMIT), "the test never released the tool"

    def run(self, func: Callable[[], Any]) -> threading.Thread:
        def target() -> None:
            try:
                self.result = func()
            except BaseException as e:  # reported by the test
                self.error = e

        thread = threading.Thread(target=target)
        thread.start()
        return thread


def _write_blob_row(hs: Synapse, sha256: str) -> None:
    """A write transaction on the blob row an upload of this content would claim,
    refusing to wait for a lock (SQLite: busy timeout 0; PostgreSQL: NOWAIT)."""
    with hc.open_database(hc.load(hs.config_path)) as db:
        if db.engine == "sqlite":
            db.conn.execute("PRAGMA busy_timeout = 0")
        else:
            db.query(f"SELECT 1 FROM {index.BLOBS} WHERE sha256 = ? FOR UPDATE NOWAIT", (sha256,))
        db.execute(
            f"UPDATE {index.BLOBS} SET last_ref_ts = last_ref_ts WHERE sha256 = ?", (sha256,)
        )
        db.commit()


def test_gc_dry_run_takes_no_write_locks(
    synapse_factory: Callable[..., Synapse],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While ``gc``'s dry run is half-way (paused after the index work, where it lists the
    unreferenced contents), Synapse and the provider write as usual.

    Before the fix the dry run did the index work in one write transaction rolled back
    at the end: the write below failed with ``sqlite3.OperationalError: database is
    locked`` (on PostgreSQL: ``could not obtain lock on row``), and an upload of that
    content would have waited for the whole dry run.
    """
    hs = synapse_factory(
        storage_providers=[
            provider_entry({"backend": "file", "directory": str(tmp_path / "blobs"),
                            "delete_after": None})
        ]
    ).start()
    admin = hs.register("admin", admin=True)
    data = os.urandom(20_000)
    media_id = hs.upload(admin, data)
    resp = request(
        "DELETE",
        hs.base_url,
        f"/_synapse/admin/v1/media/{hs.server_name}/{media_id}",
        {"Authorization": f"Bearer {admin}"},
    )
    assert resp.status == 200, resp
    # No deletion job (delete_after: null): the tombstone waits for gc.
    assert hs.sql(f"SELECT COUNT(*) FROM {index.TOMBSTONES}") == [(1,)]

    pause = Paused()
    real = index.unreferenced_blobs_txn

    def unreferenced(*args: Any, **kwargs: Any) -> Any:
        pause.hold()
        return real(*args, **kwargs)

    monkeypatch.setattr(index, "unreferenced_blobs_txn", unreferenced)
    args = argparse.Namespace(
        config=str(hs.config_path), json=True, grace=0.0, apply=False, dry_run=False
    )
    thread = pause.run(lambda: tools.cmd_gc(args))
    try:
        assert pause.reached.wait(PAUSE_LIMIT), pause.error
        _write_blob_row(hs, sha(data))
        # Synapse itself writes too: the same content uploaded again, stored and recorded.
        again = hs.upload(admin, data)
    finally:
        pause.go_on.set()
        thread.join(PAUSE_LIMIT)
    assert pause.error is None and pause.result == 0, pause.error
    report = json.loads(capsys.readouterr().out)
    assert report["applied"] is False and report["paths_removed"] == 1
    # Nothing changed: the tombstone is still pending, the new upload is indexed.
    assert hs.sql(f"SELECT COUNT(*) FROM {index.TOMBSTONES}") == [(1,)]
    assert hs.sql(f"SELECT sha256 FROM {index.PATHS} WHERE file_id = ?", (again,)) == [
        (sha(data),)
    ]
