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


def test_migrate_skips_half_written_files_and_never_replaces_a_recorded_path(
    synapse_factory: Callable[..., Synapse],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``migrate`` from the local media store while Synapse writes into it.

    * ``half``: a file shorter than its Synapse row says (a download or upload still
      being written in place) is skipped and reported, never stored under its own
      (wrong) hash;
    * ``fresh``: a file modified within ``--min-age`` is skipped for the same reason;
    * ``raced``: the provider records the path (the complete content) after migrate
      looked it up and before migrate records its own reading of the file: the
      provider's entry stays. The interleaving is forced by recording it from inside
      migrate's hashing of that file.

    Before the fix: the assertion on ``skipped_incomplete`` failed (KeyError, no such
    counter; run without it, ``half``'s path pointed at the SHA-256 of its first 20 000
    bytes, ``fresh`` was migrated, and ``raced``'s entry was overwritten with the
    SHA-256 of the bytes on disk).
    """
    hs = synapse_factory(
        storage_providers=[
            provider_entry({"backend": "file", "directory": str(tmp_path / "blobs")})
        ]
    ).start()
    token = hs.register("alice")
    half_data, raced_data, fresh_data = (os.urandom(n) for n in (50_000, 40_000, 30_000))
    half, raced, fresh = (hs.upload(token, d) for d in (half_data, raced_data, fresh_data))

    def entry(media_id: str) -> list[tuple]:
        return hs.sql(f"SELECT * FROM {index.PATHS} WHERE file_id = ?", (media_id,))

    def local_file(media_id: str) -> Path:
        return hs.media_store / "local_content" / media_id[:2] / media_id[2:4] / media_id[4:]

    saved = entry(raced)
    assert len(saved) == 1 and saved[0][1] == sha(raced_data)
    # As if the provider had not recorded them yet (e.g. added to a running server),
    # and uploaded before Synapse 1.128, which recorded no SHA-256 to compare with.
    for media_id in (half, raced, fresh):
        hs.sql(f"DELETE FROM {index.PATHS} WHERE file_id = ?", (media_id,))
        hs.sql("UPDATE local_media_repository SET sha256 = NULL WHERE media_id = ?", (media_id,))
    long_ago = local_file(half).stat().st_mtime - 7200
    local_file(half).write_bytes(half_data[:20_000])  # still being written
    changed = bytes(b ^ 0xFF for b in raced_data)  # what a later writer left on disk
    local_file(raced).write_bytes(changed)
    for media_id in (half, raced):
        os.utime(local_file(media_id), (long_ago, long_ago))

    real_hash = tools.hash_file

    def hash_file(path: str) -> Any:
        if Path(path) == local_file(raced):
            # The provider records the complete content now, between migrate's lookup
            # of the path and its own record.
            placeholders = ", ".join("?" for _ in saved[0])
            hs.sql(f"INSERT INTO {index.PATHS} VALUES ({placeholders})", saved[0])
        return real_hash(path)

    monkeypatch.setattr(tools, "hash_file", hash_file)
    args = argparse.Namespace(
        config=str(hs.config_path), json=True, from_legacy_prefix=None, keep_source=False,
        dry_run=False, min_age=3600.0,
    )
    code = tools.cmd_migrate(args)
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["skipped_incomplete"] == 1 and report["skipped_recent"] == 1, report
    assert code == 1  # files were left unmigrated
    assert f"local_content/{half[:2]}/{half[2:4]}/{half[4:]}" in out.err
    assert entry(half) == [] and entry(fresh) == []
    assert entry(raced) == saved  # the provider's entry, not migrate's reading



def test_migrate_whose_claim_gc_released_fails_with_a_clear_error(
    synapse_factory: Callable[..., Synapse],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``gc`` releases a claim of ``migrate``'s between its claim and its record (a run
    stalled for over a day): the path is not recorded, and the run ends with one clear
    line naming the file, not a traceback. The release is forced right after the claim's
    transaction commits, from another connection.

    Before the fix: ``index.LostClaim`` escaped ``cmd_migrate`` (a traceback).
    """
    hs = synapse_factory(
        storage_providers=[
            provider_entry({"backend": "file", "directory": str(tmp_path / "blobs")})
        ]
    ).start()
    token = hs.register("alice")
    media_id = hs.upload(token, os.urandom(30_000))
    hs.sql(f"DELETE FROM {index.PATHS} WHERE file_id = ?", (media_id,))
    released: list[int] = []
    real_run = index.run_tool_txn

    def run_tool_txn(db: Any, func: Any, *args: Any) -> Any:
        result = real_run(db, func, *args)
        if func is index.claim_blob_txn:
            released.extend(
                r[0] for r in hs.sql(f"SELECT 1 FROM {index.CLAIMS}")
            )
            hs.sql(f"DELETE FROM {index.CLAIMS}")  # what gc's stale-claim release does
        return result

    monkeypatch.setattr(index, "run_tool_txn", run_tool_txn)
    args = argparse.Namespace(
        config=str(hs.config_path), json=True, from_legacy_prefix=None, keep_source=False,
        dry_run=False, min_age=0.0,
    )
    with pytest.raises(hc.ToolError, match=f"{media_id[4:]}: .*run migrate again"):
        tools.cmd_migrate(args)
    assert released == [1]  # the race happened: migrate's claim was released
    assert hs.sql(f"SELECT * FROM {index.PATHS} WHERE file_id = ?", (media_id,)) == []
